"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling").

Reads top to bottom like the paper's figure 1:

    images [N, C, H, W]
      -> random masking           mask [N, L]: ceil(mask_ratio x cells) cells of mask_patch_size pixels,
                                  each covering its model patches (§3.2, table 1; tasks/masking.py)
      -> forward_encoder          the shared encoder on every position, the masked patches' embeddings
                                  replaced by its learned mask token (§3.2): patch tokens [N, D, h, w]
                                  (a class token, if the encoder has one, is run and then left out)
      -> forward_decoder          the one-layer prediction head (§3.3, table 2): a 1x1 convolution to
                                  stride^2 x C values per token, PixelShuffle(stride) -> pixels [N, C, H, W]
      -> forward_loss             L1 on the masked pixels only (§3.4, eq. 1), as the reference and Hugging
                                  Face's ViTForMaskedImageModeling: sum / (masked pixels + 1e-5) / C

Names follow the reference (models/simmim.py): the encoder under `encoder.` (with its `mask_token`),
the head `decoder.0`; model.safetensors keeps that layout (`export_state`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..config import ConfigError, TaskConfig
from .masking import RandomMaskGenerator
from ..models import build_encoder
from .base import ModelExport, Task, TaskOutput, images_of, register_task
from .mae import check_mask_ratio
from .pictures import reconstruction_grid


@dataclass
class SimMIMConfig(TaskConfig):
    name: str = "simmim"
    mask_patch_size: int = 32             # §3.2 and table 1: random masking of 32x32-pixel patches
    mask_ratio: float = 0.6               # table 1 (and the ViT-B config's DATA.MASK_RATIO)


@dataclass(kw_only=True)
class SimMIMOutput(TaskOutput):
    pred: torch.Tensor                  # [N, C, H, W], the reconstructed image (normalised pixels)
    mask: torch.Tensor                  # [N, L], 1 = masked (replaced by the mask token), at the encoder's grid


@register_task
class SimMIM(Task):
    """SimMIM pre-training (Xie et al. 2022): masked patches replaced by a token, their pixels regressed (L1)."""
    name = "simmim"
    Config = SimMIMConfig
    evaluation = "knn"                    # the k-NN monitor, when eval.knn_every is set
    encoder_forwards = frozenset({"mask_token"})
    reconstructs = True

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        check_mask_ratio(cfg.task.mask_ratio)
        with torch.device("meta"):  # the encoder's stride, grid and norm, without memory or time
            encoder = build_encoder(cfg.model, num_classes=0)
        stride, grid = encoder.patch_size, encoder.grid_size
        image, size = [g * stride for g in grid], cfg.task.mask_patch_size
        if size <= 0 or size % stride or image[0] % size or image[1] % size:
            fits = [m for m in range(stride, min(image) + 1, stride) if image[0] % m == 0 and image[1] % m == 0]
            fit = max((m for m in fits if m <= size), default=fits[0])
            shown = image[0] if image[0] == image[1] else image
            raise ConfigError(f"task.mask_patch_size={size} must be a multiple of the encoder's {stride}-pixel patches "
                              f"(model.patch_size) and divide the {shown}-pixel images (model.img_size): use e.g. "
                              f"task.mask_patch_size={fit}")
        if isinstance(getattr(encoder, "norm", None), nn.Identity):
            raise ConfigError(f"model.global_pool={cfg.model.get('global_pool')} moves the encoder's final norm after "
                              "pooling (fc_norm), so SimMIM's head would read un-normalised tokens; the reference "
                              "pre-trains with the norm on every token: set model.global_pool=token")

    @classmethod
    def build(cls, cfg, num_classes: int = 0) -> "SimMIM":
        return cls(build_encoder(cfg.model, num_classes=0), mask_patch_size=cfg.task.mask_patch_size,
                   mask_ratio=cfg.task.mask_ratio)

    def __init__(self, encoder: nn.Module, mask_patch_size: int = 32, mask_ratio: float = 0.6):
        super().__init__()
        self.encoder = encoder
        encoder.add_mask_token()                       # trunc-normal 0.02, as the reference
        self.stride = encoder.patch_size               # the encoder's total stride: pixels per token side
        self.grid_size = tuple(encoder.grid_size)
        self.in_chans = encoder.config["in_chans"]
        self.mask_patch_size, self.mask_ratio = mask_patch_size, mask_ratio
        self.masking = RandomMaskGenerator(self.grid_size, self.stride, mask_patch_size, mask_ratio)
        # §3.3, table 2: a linear head is as good as heavier ones; PyTorch's default initialisation, as
        # the reference's
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride ** 2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride))

    # ---------------------------------------------------------------------------------------

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.encoder.forward_features(images, mask=mask)                     # [N, P + L, D]
        x = x[:, self.encoder.num_prefix_tokens:]                                # [N, L, D], patches only
        return rearrange(x, "n (h w) d -> n d h w", h=self.grid_size[0])         # [N, D, h, w]

    def forward_decoder(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)                                                   # [N, C, H, W]

    def mask_pixels(self, mask: torch.Tensor) -> torch.Tensor:
        """The patch mask [N, L] as pixels [N, 1, H, W] (1 = masked)."""
        mask = mask.reshape(-1, *self.grid_size).float()
        return mask.repeat_interleave(self.stride, 1).repeat_interleave(self.stride, 2).unsqueeze(1)

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L1 over the masked pixels, averaged per masked pixel and channel (eq. 1; the reference's
        `sum / (mask.sum() + 1e-5) / in_chans`, its mask one channel deep)."""
        pixels = self.mask_pixels(mask)                                          # [N, 1, H, W]
        l1 = F.l1_loss(pred.float(), images.float(), reduction="none")           # [N, C, H, W]
        return (l1 * pixels).sum() / (pixels.sum() + 1.0e-5) / self.in_chans

    def forward(self, batch: Union[dict, torch.Tensor], mask: Optional[torch.Tensor] = None) -> SimMIMOutput:
        images = images_of(batch)
        if mask is None and isinstance(batch, dict):
            mask = batch.get("mask")
        if mask is None:
            mask = self.masking(images.shape[0], device=images.device)          # the run's RNG: exact resume
        z = self.forward_encoder(images, mask)
        pred = self.forward_decoder(z)
        loss = self.forward_loss(images, pred, mask)
        return SimMIMOutput(loss=loss, pred=pred, mask=mask.float())

    # ---------------------------------------------------------------------------------------
    # what the rest of ssl_vit asks of a task

    def no_weight_decay(self) -> set[str]:
        """None of its own: the head's bias is 1-D (never decayed) and its weight decays, as the reference;
        the encoder's mask token is in the encoder's own list."""
        return set()

    def picture_split(self) -> str:
        return "train"  # its first training images, reconstructed under the same masks every time

    def pictures(self, images: torch.Tensor, denormalize) -> dict[str, torch.Tensor]:
        return {"reconstructions": reconstruction_grid(self.reconstruct(images, seed=0), denormalize)}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    seed: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Pictures for people, in the input's (normalised) pixel space [N, C, H, W]: the masked input,
        the prediction for every pixel and the prediction pasted into the masked pixels only. The masks
        come from `mask` [N, L], or from `seed` (the same seed, the same masks)."""
        if mask is None:
            generator = torch.Generator().manual_seed(seed or 0)
            mask = self.masking(images.shape[0], generator=generator).to(images.device)
        output = self.forward(images, mask)
        pixels = self.mask_pixels(output.mask).expand_as(images)                 # [N, C, H, W], 1 = masked
        original, pred = images.float(), output.pred.float()
        return {"original": original, "masked": original * (1 - pixels), "reconstruction": pred,
                "pasted": original * (1 - pixels) + pred * pixels, "mask": pixels}

    def export_state(self, evaluation: Optional[dict] = None) -> ModelExport:
        """model.safetensors in the reference's layout: `encoder.*` (its mask token included) and
        `decoder.0.*`, so official SimMIM checkpoints and ours read alike. The prefix also keeps a
        top-level `mask_token` out of the file, which ssl_vit reads as official MAE and timm as DINOv2."""
        return ModelExport(dict(self.state_dict()), dict(self.encoder.config), timm_loadable=False)

    @classmethod
    def checkpoint_format(cls, state: Mapping[str, torch.Tensor]) -> Optional[str]:
        head = state.get("decoder.0.weight")
        claimed = head is not None and head.ndim == 4 and head.shape[-2:] == (1, 1)   # the 1x1 convolution
        return "SimMIM (encoder.* and a 1x1-convolution head)" if claimed else None

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor], recorded: Mapping[str, Any],
                          path: str = "") -> dict[str, Any]:
        """The masking a file recorded (our JSON's task section); the head's shape is the encoder's."""
        return {key: recorded[key] for key in ("mask_patch_size", "mask_ratio") if recorded.get(key) is not None}
