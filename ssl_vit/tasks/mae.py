"""Masked autoencoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Reads top to bottom like the paper's figure 1:

    images [N, C, H, W]
      -> patchify                     targets [N, L, p*p*C]
      -> random_masking               keep (1 - mask_ratio) of the L patches per sample (§3)
      -> forward_encoder              the shared encoder on the visible patches only [N, 1 + K, D]
      -> forward_decoder              + mask tokens, unshuffle, fixed sin-cos positions,
                                      lightweight blocks -> pixels [N, L, p*p*C]
      -> forward_loss                 MSE on the masked patches only, optionally against
                                      per-patch normalised pixels (norm_pix_loss, table 1c)

Parameter names follow the reference code (`decoder_embed`, `mask_token`, `decoder_pos_embed`,
`decoder_blocks`, `decoder_norm`, `decoder_pred`; the encoder's under `encoder.`), so official
MAE checkpoints, with or without the decoder, load through `ssl_vit.load_weights`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
from einops import rearrange
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block

from ..config import ConfigError, TaskConfig
from ..models import LoadReport, build_encoder, sincos_2d_pos_embed
from .base import Task, TaskOutput, images_of, register_task
from .pictures import reconstruction_grid

DECODER_PREFIXES = ("decoder_", "mask_token")


def decoder_depth(state: Mapping[str, torch.Tensor]) -> int:
    """The number of decoder blocks in an MAE state dict (official layout, ours: `decoder_blocks.<i>.`)."""
    return len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})


@dataclass
class MAEConfig(TaskConfig):
    name: str = "mae"
    mask_ratio: float = 0.75              # §4, fig. 5: 75% works best for fine-tuning and linear probing
    decoder_dim: int = 512                # table 1b
    decoder_depth: int = 8                # table 1a
    decoder_heads: int = 16               # reference code (models_mae.py)
    norm_pix_loss: bool = True            # table 1c: per-patch normalised pixels as targets


def check_mask_ratio(value: float, key: str = "task.mask_ratio", patches: int = 0) -> float:
    """The fraction of patches masked: in (0, 1), and with `patches` (the grid's count) at least one
    patch masked and one kept. With none masked, the loss (a mean over the masked patches) is 0 / 0:
    every step would be skipped as non-finite, the run would train nothing."""
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{key}={value} must be in (0, 1): the fraction of patches masked, whose reconstruction "
                          "is the loss (MAE: 0.75, SimMIM: 0.6)")
    keep = int(patches * (1 - value))
    if patches and not 0 < keep < patches:
        raise ConfigError(f"{key}={value} of the encoder's {patches} patches {'keeps none' if keep == 0 else 'masks none'}"
                          f": give a value between {1 / patches:.3g} and {1 - 1 / patches:.3g}")
    return value


@dataclass(kw_only=True)
class MAEOutput(TaskOutput):
    pred: torch.Tensor                  # [N, L, p*p*C], in the (normalised, if norm_pix_loss) target space
    mask: torch.Tensor                  # [N, L], 1 = masked (removed), 0 = visible


@register_task
class MAE(Task):
    """masked autoencoder pre-training (He et al. 2022): 75% of the patches removed, pixels predicted."""
    name = "mae"
    Config = MAEConfig
    evaluation = "knn"                    # the k-NN monitor, when eval.knn_every is set
    encoder_forwards = frozenset({"visible"})
    reconstructs = True

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        with torch.device("meta"):  # the encoder's grid, without memory or time
            encoder = build_encoder(cfg.model, num_classes=0)
        check_mask_ratio(cfg.task.mask_ratio, patches=encoder.grid_size[0] * encoder.grid_size[1])
        if cfg.task.decoder_dim % cfg.task.decoder_heads:
            raise ConfigError(f"task.decoder_dim={cfg.task.decoder_dim} is not divisible by "
                              f"task.decoder_heads={cfg.task.decoder_heads}")
        if not cfg.model.get("class_token", True) or cfg.model.get("dist_token", False) or \
                cfg.model.get("reg_tokens", 0):
            raise ConfigError("MAE's encoder has exactly one prefix token, the class token: set "
                              "model.class_token=true, model.dist_token=false and model.reg_tokens=0")

    @classmethod
    def build(cls, cfg, num_classes: int = 0) -> "MAE":
        task = cfg.task
        return cls(build_encoder(cfg.model, num_classes=0), decoder_dim=task.decoder_dim,
                   decoder_depth=task.decoder_depth, decoder_heads=task.decoder_heads, mask_ratio=task.mask_ratio,
                   norm_pix_loss=task.norm_pix_loss)

    def __init__(self, encoder: nn.Module, *, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if encoder.cls_token is None or encoder.num_prefix_tokens != 1:
            raise ValueError("MAE's encoder has exactly one prefix token, the class token (class_token=True, "
                             "dist_token=False, reg_tokens=0)")
        check_mask_ratio(mask_ratio, "mask_ratio")
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch = encoder.patch_size
        self.in_chans = encoder.config["in_chans"]
        num_patches = encoder.patch_embed.num_patches

        # the lightweight decoder (§3, table 1a-b): its own width, fixed 2-D sin-cos positions
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d_pos_embed(decoder_dim, encoder.grid_size, 1))
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch ** 2 * self.in_chans)
        self.num_patches = num_patches
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """As the reference: xavier-uniform linears (the patch embedding too, viewed as a linear),
        normal(0.02) class and mask tokens, zero biases, unit LayerNorms."""
        patch_weight = self.encoder.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
        torch.nn.init.normal_(self.encoder.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------------------------------

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], patches in row-major order, pixels (p, q, c) as MAE."""
        return rearrange(images, "n c (h p) (w q) -> n (h w) (p q c)", p=self.patch, q=self.patch)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]."""
        height = self.encoder.grid_size[0]
        return rearrange(patches, "n (h w) (p q c) -> n c (h p) (w q)", h=height, p=self.patch, q=self.patch)

    def random_masking(self, batch_size: int, device: torch.device, noise: Optional[torch.Tensor] = None):
        """Per-sample random masking by argsort of noise (§3): the patches with the smallest noise
        are kept. Returns ids_keep [N, K], ids_restore [N, L] and mask [N, L] (1 = masked)."""
        length = self.num_patches
        keep = int(length * (1 - self.mask_ratio))
        if noise is None:
            noise = torch.rand(batch_size, length, device=device)   # [N, L] in [0, 1)
        ids_shuffle = torch.argsort(noise, dim=1)                   # ascending: small is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]                            # [N, K]
        mask = torch.ones(batch_size, length, device=device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)                   # [N, L], back in patch order
        return ids_keep, ids_restore, mask

    def fsdp_units(self) -> list[nn.Module]:
        return super().fsdp_units() + list(self.decoder_blocks)

    def forward_encoder(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None):
        ids_keep, ids_restore, mask = self.random_masking(images.shape[0], images.device, noise)
        latent = self.encoder.forward_features(images, ids_keep=ids_keep)  # [N, 1 + K, D]
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)                               # [N, 1 + K, Dd]
        n, visible = x.shape[0], x.shape[1] - 1
        mask_tokens = self.mask_token.expand(n, ids_restore.shape[1] - visible, -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)          # [N, L, Dd], shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed  # [N, 1 + L, Dd]
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))                  # [N, 1 + L, p*p*C]
        return x[:, 1:]                                              # drop the class token

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """The pixels the decoder predicts: [N, L, p*p*C], per-patch normalised with norm_pix_loss
        (mean and unbiased variance of each patch, + 1e-6, as the reference code)."""
        target = self.patchify(images.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss = (pred.float() - self.target(images)) ** 2
        loss = loss.mean(dim=-1)                                     # [N, L], mean per patch
        return (loss * mask).sum() / mask.sum()                      # mean over the masked patches

    def forward(self, batch: Union[dict, torch.Tensor], noise: Optional[torch.Tensor] = None) -> MAEOutput:
        images = images_of(batch)
        if noise is None and isinstance(batch, dict):
            noise = batch.get("noise")
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(images, pred, mask)
        return MAEOutput(loss=loss, pred=pred, mask=mask)

    # ---------------------------------------------------------------------------------------
    # what the rest of ssl_vit asks of a task

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def picture_split(self) -> str:
        return "train"  # its first training images, reconstructed under the same masks every time

    def pictures(self, images: torch.Tensor, denormalize) -> dict[str, torch.Tensor]:
        return {"reconstructions": reconstruction_grid(self.reconstruct(images, seed=0), denormalize)}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None,
                    seed: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Pictures for people, in the input's (normalised) pixel space [N, C, H, W]: the masked
        input, the reconstruction and the reconstruction with the visible patches pasted back. The
        masks come from `noise`, or from `seed` (the same seed, the same masks). With norm_pix_loss
        the prediction is de-normalised with each patch's own statistics, as the official MAE demo does."""
        if noise is None:
            generator = torch.Generator().manual_seed(seed or 0)
            noise = torch.rand(images.shape[0], self.num_patches, generator=generator).to(images.device)
        output = self.forward(images, noise)
        pred = output.pred.float()
        if self.norm_pix_loss:
            patches = self.patchify(images.float())
            mean = patches.mean(dim=-1, keepdim=True)
            var = patches.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        mask = output.mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1])          # [N, L, p*p*C]
        mask_image = self.unpatchify(mask)                                        # 1 = masked
        reconstruction = self.unpatchify(pred)
        return {"original": images.float(), "masked": images.float() * (1 - mask_image),
                "reconstruction": reconstruction,
                "pasted": images.float() * (1 - mask_image) + reconstruction * mask_image,
                "mask": mask_image}

    # model.safetensors is the official layout, decoder included: the default export_state

    def fit_state_dict(self, state: dict[str, torch.Tensor], metadata: Mapping[str, str],
                       report: LoadReport) -> dict[str, torch.Tensor]:
        """The decoder's position table is fixed sin-cos: recomputed for this module's grid."""
        key = "decoder_pos_embed"
        if key in state and state[key].shape != self.decoder_pos_embed.shape:
            state[key] = self.decoder_pos_embed.clone()
            report.resized.append(f"{key} (fixed sin-cos, recomputed for grid {self.encoder.grid_size})")
        return state

    @classmethod
    def checkpoint_format(cls, state: Mapping[str, torch.Tensor]) -> Optional[str]:
        return "official MAE (with decoder)" if "decoder_pred.weight" in state else None

    @classmethod
    def convert_checkpoint(cls, state: dict[str, torch.Tensor], module: nn.Module, report: LoadReport) -> dict:
        """Official MAE checkpoints (facebookresearch/mae): the decoder (`decoder_*`, `mask_token`) is
        kept only for an MAE module. MAE fine-tuning drops the pre-training `norm` for a fresh `fc_norm`
        (main_finetune.py), which the encoder's load reports as unexpected."""
        if isinstance(module, MAE):
            return state
        dropped = [k for k in state if k.startswith(DECODER_PREFIXES)]
        report.unexpected += dropped
        if dropped:
            report.notes.append(f"the MAE decoder ({len(dropped)} tensors) is not part of this module and was ignored")
        return {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIXES)}

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor], recorded: Mapping[str, Any],
                          path: str = "") -> dict[str, Any]:
        """The decoder's width and depth from its tensors; heads, norm_pix_loss and mask_ratio from
        what the file recorded (our JSON, or the official checkpoints' training arguments)."""
        settings = {"decoder_dim": state["decoder_embed.weight"].shape[0],
                    "decoder_depth": decoder_depth(state)}
        for key in ("decoder_heads", "norm_pix_loss", "mask_ratio"):
            if recorded.get(key) is not None:
                settings[key] = recorded[key]
        if "norm_pix_loss" not in settings and "visualize" in Path(path).name:
            # the MAE demo's checkpoints record nothing; they are "an MAE model trained with pixels as
            # targets for visualization" (facebookresearch/mae, demo/mae_visualize.ipynb)
            settings["norm_pix_loss"] = False
        return settings
