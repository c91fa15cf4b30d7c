"""What is trained on top of the shared encoder: one module per method, each owning its head and loss.

    build(cfg) -> nn.Module whose forward(batch) returns an output with `.loss` (a scalar) and
                  `.metrics` (a dict of floats to log); the training loop never asks which task it runs.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from ..models.vit import VisionTransformer, create_encoder
from .mae import MAE, MAEOutput

__all__ = ["MAE", "MAEOutput", "build", "build_encoder"]


def build_encoder(model_cfg) -> VisionTransformer:
    """The encoder a recipe's `model:` section describes."""
    options = OmegaConf.to_container(model_cfg, resolve=True)
    arch = options.pop("arch")
    return create_encoder(arch, **options)


def build_mae(cfg, encoder: VisionTransformer) -> MAE:
    task = cfg.task
    return MAE(encoder, decoder_dim=task.decoder_dim, decoder_depth=task.decoder_depth,
               decoder_heads=task.decoder_heads, mask_ratio=task.mask_ratio, norm_pix_loss=task.norm_pix_loss)


BUILDERS = {"mae": build_mae}


def build(cfg, encoder: VisionTransformer | None = None):
    return BUILDERS[cfg.task.name](cfg, encoder if encoder is not None else build_encoder(cfg.model))
