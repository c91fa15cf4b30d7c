"""The encoder of ssl_vit's discrete VAE: a vector-quantised VAE (van den Oord et al. 2017, "Neural
Discrete Representation Learning") whose codes BEiT predicts; tasks/dvae.py trains it with its decoder,
tokenizers/vq.py puts it behind the tokenizer contract.

    images [B, C, H, W] (normalised)
      -> stem: num_downsamples strided 4x4 convolutions     [B, hidden, H / s, W / s]   s = 2^num_downsamples
      -> num_res_blocks residual blocks (ReLU, 3x3, ReLU, 1x1)                          (VQ-VAE §4.1)
      -> ReLU, 1x1 projection, l2-normalised                 [B, code_dim, h, w]  (`forward_features`)
      -> the nearest of vocab_size l2-normalised codes      [B, h, w]            (`codes`)

The lookup is ViT-VQGAN's (Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN",
§3.2): codes looked up in a low-dimensional space (code_dim) and l2-normalised on both sides, so the
nearest code is the one of highest cosine similarity; both improve how many codes get used.

It is an encoder family (model.arch=dvae) so that the dvae task runs in the training loop like any
other: its `backbone.safetensors` is this module (codebook included); `forward_head` mean-pools the
normalised features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, ModelConfig
from .base import EncoderFamily, register_family


@dataclass
class DVAEEncoderConfig(ModelConfig):
    """The `model:` keys of the dvae encoder (model.arch=dvae)."""
    arch: str = "dvae"
    hidden_dim: int = 256                 # VQ-VAE §4.1: 256 hidden units in every layer
    num_downsamples: int = 2              # VQ-VAE §4.1: two strided 4x4 convolutions (a code per 4x4 pixels); >= 1
    num_res_blocks: int = 2               # VQ-VAE §4.1: two residual blocks (ReLU, 3x3 conv, ReLU, 1x1 conv)
    code_dim: int = 32                    # ViT-VQGAN §3.2: codes looked up in a 32-d space, l2-normalised
    vocab_size: int = 8192                # codebook entries (ViT-VQGAN's and DALL-E's 8192)


class ResBlock(nn.Module):
    """VQ-VAE's residual block: x + 1x1(ReLU(3x3(ReLU(x))))."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class DVAEEncoder(nn.Module):
    """The dvae encoder and its codebook. Keyword-only arguments as `DVAEEncoderConfig`."""

    def __init__(self, *, arch: str = "dvae", img_size: Any = 224, in_chans: int = 3, num_classes: int = 0,
                 drop_path_rate: float = 0.0, hidden_dim: int = 256, num_downsamples: int = 2,
                 num_res_blocks: int = 2, code_dim: int = 32, vocab_size: int = 8192):
        super().__init__()
        check_options(hidden_dim=hidden_dim, num_downsamples=num_downsamples, num_res_blocks=num_res_blocks,
                      code_dim=code_dim, vocab_size=vocab_size)
        img_size = list(img_size) if isinstance(img_size, (list, tuple)) else [img_size, img_size]
        self.config = dict(arch=arch, img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                           hidden_dim=hidden_dim, num_downsamples=num_downsamples, num_res_blocks=num_res_blocks,
                           code_dim=code_dim, vocab_size=vocab_size)
        self.stride, self.vocab_size, self.code_dim = 2 ** num_downsamples, vocab_size, code_dim
        self.num_features, self.num_classes = code_dim, num_classes
        layers: list[nn.Module] = []
        for i in range(num_downsamples):  # VQ-VAE: strided 4x4 convolutions, ReLU between them
            layers += [nn.Conv2d(in_chans if i == 0 else hidden_dim, hidden_dim, 4, stride=2, padding=1), nn.ReLU()]
        self.stem = nn.Sequential(*layers[:-1])                              # [B, hidden, h, w]
        self.blocks = nn.Sequential(*[ResBlock(hidden_dim) for _ in range(num_res_blocks)])
        self.proj = nn.Conv2d(hidden_dim, code_dim, 1)
        # codes drawn like the projection's outputs would be: any direction (they are l2-normalised)
        self.codebook = nn.Parameter(torch.randn(vocab_size, code_dim))
        self.head = nn.Linear(code_dim, num_classes) if num_classes else nn.Identity()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The l2-normalised features [B, code_dim, h, w] that are quantised."""
        x = self.blocks(self.stem(images))
        return F.normalize(self.proj(F.relu(x)), dim=1)

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1)                             # [V, code_dim]

    def similarity(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every feature to every code: [B, h, w, V]."""
        return torch.einsum("bdhw,vd->bhwv", z, self.normalized_codebook().to(z.dtype))

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest code of each feature (highest cosine similarity): [B, h, w]."""
        return self.similarity(z).argmax(dim=-1)

    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.forward_features(images))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))                                          # [B, code_dim]
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    # what the optimizer and wrappers ask
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None), (r"^(proj|codebook)", (99999,))])

    def no_weight_decay(self) -> set[str]:
        return {"codebook"}  # unit vectors by construction: decaying their length changes nothing but the lr

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ConfigError("the dvae encoder has no activation checkpointing (it is small): set "
                              "train.grad_checkpointing=false")

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = self.config["num_classes"] = num_classes
        self.head = nn.Linear(self.code_dim, num_classes) if num_classes else nn.Identity()


def check_options(**options: int) -> None:
    low = {"hidden_dim": 1, "num_downsamples": 1, "num_res_blocks": 0, "code_dim": 1, "vocab_size": 2}
    for key, value in options.items():
        if value < low[key]:
            raise ValueError(f"{key}={value} must be >= {low[key]}")


@register_family
class DVAEFamily(EncoderFamily):
    """the encoder of ssl_vit's vector-quantised VAE (tasks/dvae.py): the visual tokenizer BEiT can predict."""
    name = "dvae"
    Config = DVAEEncoderConfig
    archs = {"dvae": {}}
    architecture_keys = ("arch", "img_size", "in_chans", "hidden_dim", "num_downsamples", "num_res_blocks",
                         "code_dim", "vocab_size")

    @classmethod
    def validate(cls, cfg) -> None:
        m = cfg.model
        try:
            check_options(hidden_dim=m.hidden_dim, num_downsamples=m.num_downsamples,
                          num_res_blocks=m.num_res_blocks, code_dim=m.code_dim, vocab_size=m.vocab_size)
        except ValueError as e:
            raise ConfigError(f"model.{e}") from None
        if m.drop_path_rate:
            raise ConfigError(f"model.drop_path_rate={m.drop_path_rate}: the dvae encoder has no drop path; set 0")
        stride = 2 ** m.num_downsamples
        sizes = [m.img_size] * 2 if isinstance(m.img_size, int) else list(m.img_size)
        if any(s % stride for s in sizes):
            raise ConfigError(f"model.img_size={m.img_size} is not a multiple of the encoder's stride {stride} "
                              f"(model.num_downsamples={m.num_downsamples}): use e.g. "
                              f"model.img_size={max(stride, sizes[0] // stride * stride)}")

    @classmethod
    def fsdp_units(cls, encoder: DVAEEncoder) -> list[nn.Module]:
        return list(encoder.blocks)

    @classmethod
    def create(cls, arch: str = "dvae", **options: Any) -> DVAEEncoder:
        unknown = set(options) - set(DVAEEncoder.__init__.__kwdefaults__)
        if unknown:
            raise TypeError(f"create_encoder({arch!r}) got unknown option(s) {sorted(unknown)}")
        return DVAEEncoder(arch=arch, **options)
