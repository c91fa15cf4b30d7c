"""BEiT (Bao et al. 2022, "BEiT: BERT Pre-Training of Image Transformers"): masked image modelling with
visual tokens as the targets.

Reads top to bottom like the paper's figure 1:

    one random crop, two views (RandomResizedCropAndInterpolationWithTwoPic, §2.5 and appendix)
      model view       images [N, C, H, W], bicubic, normalised on the device
      tokenizer view   tokenizer_images [N, C, H', W'], lanczos, uint8; H' = grid x the tokenizer's stride
    -> tokenize               the frozen tokenizer's code for every patch: tokens [N, L]   (§2.2)
    -> blockwise masking      ~40% of the patches in rectangles (Algorithm 1): mask [N, L]   (§2.3)
    -> forward_encoder        the shared encoder on every position, masked patch embeddings replaced
                              by its learned mask token: patch tokens [N, L, D]              (§2.3)
    -> forward_head           lm_head (D -> vocabulary) on the masked positions only: [N, K, V]
    -> forward_loss           cross-entropy against their tokens, averaged over the masked positions
                              (eq. 1; unilm's engine_for_pretraining.py); the masked-token accuracy
                              (`mlm_top1`, the reference's mlm_acc) is logged beside it

The tokenizer (ssl_vit/tokenizers: DALL-E's dVAE encoder, or one trained by task.name=dvae) is frozen
and held outside the module tree, as the DeiT teacher: not in the state dict (checkpoints, exports),
the optimizer, DDP, FSDP's shards or EMA copies; `.to()` moves it, so it runs on the device in the
data-parallel step. model.safetensors is unilm's pre-training layout (the encoder's keys at the top,
`mask_token`, `lm_head.*`), so official BEiT checkpoints (beit_base_patch16_224_pt22k.pth) and ours
load alike: into this task to continue pre-training, or into a classifier to fine-tune (lm_head dropped).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..config import ConfigError, TaskConfig
from .masking import BlockwiseMaskGenerator
from ..data.transforms import Transform, decode_pil, pil_to_uint8
from ..models import LoadReport, build_encoder
from ..tokenizers import RANDOM, Tokenizer, build_tokenizer, read_description, tokenizer_stride
from .base import HoldsFrozenModule, Task, TaskOutput, images_of, register_task

INIT_STD = 0.02                           # unilm beit/modeling_pretrain.py `init_std`, lm_head included
BEIT_FORMAT = "official BEiT (unilm pre-training, with lm_head)"


@dataclass
class TokenizerConfig:
    """Where BEiT's visual tokens come from (frozen; ssl_vit/tokenizers)."""
    path: Optional[str] = None            # a tokenizer file: tools/convert_tokenizer.py's DALL-E or a dvae run's; or random


@dataclass
class BEiTConfig(TaskConfig):
    name: str = "beit"
    num_mask_patches: int = 75            # run_beit_pretraining.py --num_mask_patches: 75 of 196 (~40%, §2.3)
    min_mask_patches_per_block: int = 16  # --min_mask_patches_per_block (Algorithm 1's s >= 16)
    max_mask_patches_per_block: Optional[int] = None  # --max_mask_patches_per_block; None: num_mask_patches
    color_jitter: float = 0.0             # brightness, contrast, saturation before the crop; 0.4 in the appendix's table
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass(kw_only=True)
class BEiTOutput(TaskOutput):
    logits: torch.Tensor                # [N, K, V]: lm_head on K gathered positions (the masked ones first)
    valid: torch.Tensor                 # [N, K] bool: which of the K are masked (a sample may mask fewer)
    targets: torch.Tensor               # [N, K], their tokens
    mask: torch.Tensor                  # [N, L] bool, 1 = masked
    tokens: torch.Tensor                # [N, L], the tokenizer's code of every patch


@register_task
class BEiT(HoldsFrozenModule, Task):
    """BEiT pre-training (Bao et al. 2022): blockwise-masked patches, their visual tokens predicted."""
    name = "beit"
    Config = BEiTConfig
    frozen_module = "tokenizer"           # outside the state dict, optimizer, DDP / FSDP and EMA (HoldsFrozenModule)
    evaluation = "knn"                    # the k-NN monitor, when eval.knn_every is set
    encoder_forwards = frozenset({"mask_token"})

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        task = cfg.task
        with torch.device("meta"):  # the encoder's grid and norm, without memory or time
            encoder = build_encoder(cfg.model, num_classes=0)
        patches = encoder.grid_size[0] * encoder.grid_size[1]
        if not 0 < task.num_mask_patches <= patches:
            raise ConfigError(f"task.num_mask_patches={task.num_mask_patches} must be in 1..{patches} (the encoder's "
                              f"{encoder.grid_size[0]}x{encoder.grid_size[1]} patches); BEiT masks 75 of 196, about "
                              f"40%: use e.g. task.num_mask_patches={max(1, round(0.4 * patches))}")
        low, high = task.min_mask_patches_per_block, task.max_mask_patches_per_block
        if not 1 <= low <= task.num_mask_patches or (high is not None and not low <= high):
            raise ConfigError(f"task.min_mask_patches_per_block={low} must be in 1..task.num_mask_patches="
                              f"{task.num_mask_patches}, and task.max_mask_patches_per_block={high} at least as large")
        if cfg.data.train_transform != "rrc":
            raise ConfigError(f"data.train_transform={cfg.data.train_transform} would be ignored: BEiT makes its own two "
                              "views of one random resized crop (data.crop_scale, data.hflip, task.color_jitter); "
                              "leave data.train_transform=rrc")
        if not 0 <= task.color_jitter <= 1:
            raise ConfigError(f"task.color_jitter={task.color_jitter} must be in [0, 1] (the paper: 0.4)")
        if isinstance(getattr(encoder, "norm", None), nn.Identity):
            raise ConfigError(f"model.global_pool={cfg.model.get('global_pool')} moves the encoder's final norm after "
                              "pooling (fc_norm), so lm_head would read un-normalised tokens; BEiT pre-trains with the "
                              "norm on every token: set model.global_pool=token")
        path = task.tokenizer.path
        if path and path != RANDOM:
            tokenizer = read_description(path)
            if tokenizer["in_chans"] != encoder.config["in_chans"]:
                raise ConfigError(f"task.tokenizer.path={path} reads {tokenizer['in_chans']}-channel images, the model "
                                  f"{encoder.config['in_chans']} (model.in_chans)")

    @classmethod
    def build(cls, cfg, num_classes: int = 0) -> "BEiT":
        task = cfg.task
        encoder = build_encoder(cfg.model, num_classes=0)
        tokenizer = build_tokenizer(task.tokenizer.path, seed=cfg.train.seed, in_chans=encoder.config["in_chans"])
        return cls(encoder, tokenizer, num_mask_patches=task.num_mask_patches,
                   min_mask_patches_per_block=task.min_mask_patches_per_block,
                   max_mask_patches_per_block=task.max_mask_patches_per_block,
                   mean=list(cfg.data.mean), std=list(cfg.data.std))

    @classmethod
    def train_transform(cls, cfg, image_size):
        """Both views of one crop: the model's (bicubic) and the tokenizer's (lanczos), the latter of
        grid x the tokenizer's stride pixels, so that its codes fall on the encoder's patches."""
        with torch.device("meta"):
            encoder = build_encoder(cfg.model, num_classes=0)
        stride = tokenizer_stride(cfg.task.tokenizer.path)
        return TwoViewCrop(image_size, [g * stride for g in encoder.grid_size], cfg.data.crop_scale,
                           hflip=cfg.data.hflip, color_jitter=cfg.task.color_jitter)

    def __init__(self, encoder: nn.Module, tokenizer: Tokenizer, *, num_mask_patches: int = 75,
                 min_mask_patches_per_block: int = 16, max_mask_patches_per_block: Optional[int] = None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        super().__init__()
        self.encoder = encoder
        encoder.add_mask_token()                                            # trunc-normal 0.02, as unilm
        self.grid_size = tuple(encoder.grid_size)
        self.num_mask_patches = num_mask_patches
        self.masking = BlockwiseMaskGenerator(self.grid_size, num_mask_patches, min_mask_patches_per_block,
                                              max_mask_patches_per_block)
        self.lm_head = nn.Linear(encoder.num_features, tokenizer.vocab_size)
        trunc_normal_(self.lm_head.weight, std=INIT_STD, a=-INIT_STD, b=INIT_STD)
        nn.init.zeros_(self.lm_head.bias)
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1), persistent=False)
        self.__dict__["tokenizer"] = tokenizer.freeze()  # a plain attribute: see the module docstring

    def describe(self) -> str:
        masked = f"{self.num_mask_patches} of {self.grid_size[0] * self.grid_size[1]} patches masked in blocks"
        return f"{super().describe()}; {masked}\ntokenizer: {self.tokenizer.describe()}"

    # ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def tokenize(self, batch: Union[dict, torch.Tensor]) -> torch.Tensor:
        """The tokenizer's code of every patch, [N, L]. Its view is batch["tokenizer_images"] (uint8, the
        two-view transform's); without it (a direct call, the contract tests) the model's images are
        brought back to pixels and resized to the view's size (bicubic)."""
        if isinstance(batch, dict) and "tokenizer_images" in batch:
            pixels = batch["tokenizer_images"].float() / 255.0
        else:
            images = images_of(batch)
            size = [g * self.tokenizer.stride for g in self.grid_size]
            pixels = (images.float() * self.std + self.mean)
            if list(pixels.shape[-2:]) != size:
                pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
            pixels = pixels.clamp(0, 1)
        codes = self.tokenizer(pixels)                                      # [N, h, w]
        if tuple(codes.shape[-2:]) != self.grid_size:
            raise ValueError(f"the tokenizer gives a {tuple(codes.shape[-2:])} grid of codes for its "
                             f"{tuple(pixels.shape[-2:])} view, the encoder has {self.grid_size} patches")
        return codes.flatten(1)                                             # [N, L]

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.encoder.forward_features(images, mask=mask)                # [N, P + L, D]
        return x[:, self.encoder.num_prefix_tokens:]                        # [N, L, D], patches only

    def forward_head(self, patches: torch.Tensor, mask: torch.Tensor, keep: int):
        """lm_head on the masked positions: the first `keep` of each sample's positions, masked ones
        first in raster order (a stable sort), so that no host sync is needed for a boolean index.
        Returns logits [N, K, V], the positions [N, K] and which of them are masked [N, K]."""
        positions = mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :keep]   # [N, K]
        valid = mask.gather(1, positions).bool()
        gathered = patches.gather(1, positions.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # [N, K, D]
        return self.lm_head(gathered), positions, valid

    def forward_loss(self, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor):
        """Cross-entropy averaged over the masked positions, and their top-1 accuracy (percent)."""
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # [N*K]
        weights = valid.flatten().float()
        count = weights.sum().clamp_min(1.0)
        correct = (logits.argmax(dim=-1).flatten() == targets.flatten()).float()
        return (losses * weights).sum() / count, 100.0 * (correct * weights).sum() / count

    def forward(self, batch: Union[dict, torch.Tensor], mask: Optional[torch.Tensor] = None,
                tokens: Optional[torch.Tensor] = None) -> BEiTOutput:
        images = images_of(batch)
        if mask is None and isinstance(batch, dict):
            mask = batch.get("mask")
        if mask is None:  # the run's RNG: a resumed run draws the masks of an uninterrupted one
            mask, keep = self.masking(images.shape[0], device=images.device), self.num_mask_patches
        else:
            mask = mask.bool()
            keep = int(mask.sum(dim=1).max())  # a given mask: read its largest count (one sync)
        if tokens is None:
            tokens = self.tokenize(batch)
        patches = self.forward_encoder(images, mask)
        logits, positions, valid = self.forward_head(patches, mask, keep)
        targets = tokens.gather(1, positions)
        loss, accuracy = self.forward_loss(logits, targets, valid)
        return BEiTOutput(loss=loss, logits=logits, valid=valid, targets=targets, mask=mask, tokens=tokens,
                          metrics={"mlm_top1": accuracy.detach()})

    # ---------------------------------------------------------------------------------------
    # what the rest of ssl_vit asks of a task (model.safetensors: the default export_state gives
    # unilm's layout, the encoder's keys at the top with mask_token, and lm_head.*)

    @classmethod
    def checkpoint_format(cls, state: Mapping[str, torch.Tensor]) -> Optional[str]:
        return BEIT_FORMAT if "lm_head.weight" in state else None

    @classmethod
    def convert_checkpoint(cls, state: dict[str, torch.Tensor], module: nn.Module, report: LoadReport) -> dict:
        """unilm's VisionTransformerForMaskedImageModeling (beit/modeling_pretrain.py): timm's Beit keys plus
        `mask_token`, `lm_head.*` and the relative_position_index buffers (the BEiT family recomputes those).
        A BEiT task keeps everything; any other module drops the lm_head and, when its encoder has no mask
        token (fine-tuning), the mask token, each with a note."""
        if isinstance(module, BEiT):
            return state
        head = [k for k in state if k.startswith("lm_head.")]
        report.unexpected += head
        report.notes.append(f"BEiT's visual-token classifier (lm_head, {state['lm_head.weight'].shape[0]} codes) is not "
                            "part of this module and was ignored")
        encoder = module.encoder if isinstance(module, Task) else module
        dropped = set(head)
        if "mask_token" in state and getattr(encoder, "mask_token", None) is None:
            report.unexpected.append("mask_token")
            report.notes.append("BEiT's mask token is only used in pre-training and was ignored")
            dropped.add("mask_token")
        return {k: v for k, v in state.items() if k not in dropped}


# -------------------------------------------------------------------------------------------
# the two views


class TwoViewCrop(Transform):
    """BEiT's `RandomResizedCropAndInterpolationWithTwoPic` with its flip before (unilm beit/datasets.py),
    and optionally the appendix's colour jitter: one crop (torchvision's RandomResizedCrop parameters,
    ratio 3/4..4/3) resized twice, bicubic to the model's size and lanczos to the tokenizer's.
    bytes -> {"images": uint8 [C, H, W], "tokenizer_images": uint8 [C, H', W']}."""

    def __init__(self, size: Sequence[int], second_size: Sequence[int], scale: Sequence[float], *,
                 hflip: float = 0.5, color_jitter: float = 0.0, ratio: Sequence[float] = (3 / 4, 4 / 3)):
        from torchvision.transforms import ColorJitter

        self.size, self.second_size = list(size), list(second_size)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.jitter = ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter else None

    def decode(self, data: bytes):
        return decode_pil(data)

    def augment(self, image) -> dict[str, torch.Tensor]:
        from PIL import Image
        from torchvision.transforms import InterpolationMode, RandomResizedCrop
        from torchvision.transforms import functional as TF

        if self.jitter is not None:
            image = self.jitter(image)
        if self.hflip > 0 and torch.rand(1).item() < self.hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top, left, height, width = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        views = {}
        for key, size, mode in (("images", self.size, InterpolationMode.BICUBIC),
                                ("tokenizer_images", self.second_size, InterpolationMode.LANCZOS)):
            views[key] = pil_to_uint8(TF.resized_crop(image, top, left, height, width, size, interpolation=mode))
        return views


# -------------------------------------------------------------------------------------------
# official BEiT pre-training checkpoints (and our model.safetensors, the same layout)


