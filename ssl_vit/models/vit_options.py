"""The options of our ViT, checked where they are given: by the constructor (`create_encoder`) and by
the family's recipe validation (`model:` keys), with the same messages; and the timm CNN of a hybrid.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch.nn as nn

POS_EMBEDS = ("learn", "learn2d", "sincos")

# Widths, depths and heads of the named sizes: ViT-B/L/H from Dosovitskiy et al. 2021, table 1;
# ViT-Ti/S from DeiT (Touvron et al. 2021, table 1), with an MLP ratio of 4.
ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # ViT-g/14 (1.0 B) and ViT-G/14 (1.8 B): Zhai et al. 2022, "Scaling Vision Transformers", table 2
    # (MLP 6144 and 8192 wide: the ratios are those widths over the embedding's)
    "vit_giant_patch14": dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408),
    "vit_gigantic_patch14": dict(patch_size=14, embed_dim=1664, depth=48, num_heads=16, mlp_ratio=8192 / 1664),
}


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or [height, width], got {list(value)}")
    return value


def check_divisible(img_size: tuple[int, int], patch_size: int) -> None:
    if img_size[0] % patch_size or img_size[1] % patch_size:
        raise ValueError(f"img_size {list(img_size)} is not a multiple of patch_size {patch_size}; "
                         f"use e.g. img_size={math.ceil(img_size[0] / patch_size) * patch_size}")


def check_options(*, global_pool, pos_embed, patch_embed, class_token, dist_token, backbone,
                   embed_dim, num_heads, reg_tokens=0) -> None:
    if not isinstance(reg_tokens, int) or isinstance(reg_tokens, bool) or reg_tokens < 0:
        raise ValueError(f"reg_tokens={reg_tokens!r}: give a number of register tokens >= 0 (Darcet et al. 2024 "
                         "use 4)")
    if reg_tokens and dist_token:
        raise ValueError("reg_tokens with dist_token=True: DeiT's distilled ViT has no register tokens (timm's "
                         "neither); use one or the other")
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool={global_pool!r}: use 'token' (class token) or 'avg' (mean pooling)")
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without a class token")
    if dist_token and not class_token:
        raise ValueError("dist_token=True needs class_token=True (DeiT puts it second, after the class token)")
    if dist_token and global_pool != "token":
        raise ValueError("dist_token=True reads the class and distillation tokens: use global_pool='token'")
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed={pos_embed!r}: use 'learn', 'learn2d' (row and column tables) or 'sincos' "
                         "(MAE's fixed table)")
    if pos_embed == "learn2d" and embed_dim % 2:
        raise ValueError(f"pos_embed='learn2d' concatenates two tables of embed_dim / 2: embed_dim={embed_dim} is odd")
    if patch_embed not in ("conv", "hybrid"):
        raise ValueError(f"patch_embed={patch_embed!r}: use 'conv' or 'hybrid' (with backbone=<timm CNN>)")
    if patch_embed == "hybrid" and not backbone:
        raise ValueError("patch_embed='hybrid' needs backbone=<a timm CNN name>, e.g. backbone='resnet26d'")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")


def hybrid_backbone(name: str, stride: int, in_chans: int) -> nn.Module:
    """A randomly initialised timm CNN cut after the stage whose output has `stride` (the ViT
    paper's hybrids read the stride-16 map of a ResNet, Dosovitskiy et al. 2021 §3.1)."""
    import timm

    probe = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans)
    reductions = probe.feature_info.reduction()
    if stride not in reductions:
        raise ValueError(f"backbone {name!r} has feature maps at strides {reductions}, not {stride}; "
                         f"set backbone_stride to one of them")
    index = probe.feature_info.out_indices[reductions.index(stride)]
    return timm.create_model(name, pretrained=False, features_only=True, out_indices=(index,),
                             in_chans=in_chans)
