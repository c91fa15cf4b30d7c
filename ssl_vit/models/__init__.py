"""Encoder families behind one contract (models/base.py), registered by name; `model.arch` picks one.

    build_encoder(cfg.model, **overrides)   the encoder a recipe's `model:` section describes
    create_encoder("vit_base_patch16", ...)  a named encoder, any option overridden
    family_of(encoder)                       its family: weights fitting, exports, attention maps
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn
from omegaconf import OmegaConf

from . import timm_models, vit  # noqa: F401  (registers the built-in families)
from . import beit  # noqa: F401,E402  (after our ViT: messages and --help name the ViT first)
from . import swin  # noqa: F401,E402  (Swin Transformer: timm's SwinTransformer + SimMIM's mask-token forward)
from . import dvae  # noqa: F401,E402  (the discrete VAE's encoder: tasks/dvae.py trains it, tokenizers/vq.py uses it)
from ..config import CheckpointError
from .base import EncoderFamily, LoadReport, family_for_arch, family_of, register_family, registered_families
from .vit import ARCHS, VisionTransformer, sincos_2d_pos_embed

__all__ = ["ARCHS", "CheckpointError", "EncoderFamily", "LoadReport", "VisionTransformer", "build_encoder",
           "create_encoder", "describe_encoder", "family_for_arch", "family_of", "register_family",
           "registered_families", "sincos_2d_pos_embed"]


def create_encoder(name: str = "vit_base_patch16", **options: Any) -> nn.Module:
    """A named encoder of any registered family, any of its options overridden.

    >>> enc = create_encoder("vit_base_patch16", img_size=224, num_classes=1000)
    >>> enc = create_encoder(**json.load(open("model.json"))["encoder"])  # an export's config (with "arch")
    """
    name = options.pop("arch", name)
    return family_for_arch(name).create(name, **options)


def build_encoder(model_cfg, **overrides: Any) -> nn.Module:
    """The encoder a recipe's `model:` section describes (None values: the named size's)."""
    options = {**OmegaConf.to_container(model_cfg, resolve=True), **overrides}
    return create_encoder(options.pop("arch"), **{k: v for k, v in options.items() if v is not None})


def describe_encoder(encoder: nn.Module) -> str:
    """One line on what was built: "vit_tiny_patch16 (embed_dim 128, depth 4, ..., 0.80M parameters)"."""
    config = getattr(encoder, "config", {})
    shown = ("embed_dim", "depth", "num_heads", "patch_size", "window_size", "width", "img_size", "in_chans",
             "num_classes", "global_pool", "pos_embed", "dist_token")
    shape = ", ".join(f"{k} {config[k]}" for k in shown if config.get(k) not in (None, False))
    count = sum(p.numel() for p in encoder.parameters()) / 1e6
    return f"{config.get('arch', type(encoder).__name__)} encoder ({shape}{', ' if shape else ''}{count:.2f}M parameters)"
