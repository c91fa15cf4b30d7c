"""The ViT family's own weights handling, beside the model (as timm keeps `checkpoint_filter_fn`
in each model's file): fitting a file's tensors to an encoder, reading an architecture from tensor
shapes, and the timm model that rebuilds an export.

timm, DeiT and MAE encoders share timm's `VisionTransformer` key names, so fitting is mostly
deciding what to do with what differs:

    prefix tokens     a distillation token for an encoder that had none starts as the class token
                      (DeiT §4); a file's distillation token is dropped for a plain encoder
    position grid     resampled bicubic (as timm) to the module's grid; a fixed sin-cos table is
                      recomputed instead; 2-D learned row / column tables are resampled along their
                      axis, or turned into a 1-D table for an encoder that has one (exactly)
    patch kernel      an old linear kernel becomes a conv; another patch size is resampled (FlexiViT)
    classifier heads  of another size are dropped: the module keeps its own new head
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from ..config import CheckpointError
from .base import LoadReport, drop_other_heads, shape_text
from .vit_options import ARCHS
from .vit_positions import learned_2d_table, sincos_2d_pos_embed

TABLES_2D = ("pos_embed_row", "pos_embed_col")


def fit_state_dict(encoder: nn.Module, state: dict[str, torch.Tensor], metadata: Mapping[str, str],
                   report: LoadReport) -> dict[str, torch.Tensor]:
    """Make a file's tensors (keys relative to the encoder) fit the module's shapes."""
    target = encoder.state_dict()
    for key in [k for k in state if k.startswith("pre_logits.")]:  # the ViT paper's representation layer
        report.unexpected.append(key)
        del state[key]
    _check_same_architecture(state, encoder)
    file_prefix_tokens = int("cls_token" in state) + int("dist_token" in state) + _registers(state)

    # DeiT: a distillation token for an encoder that had none starts as the class token (§4).
    if "dist_token" in target and "dist_token" not in state and "cls_token" in state:
        state["dist_token"] = state["cls_token"].clone()
        report.resized.append("dist_token (initialised from the class token, with its position embedding)")
        if "pos_embed" in state and file_prefix_tokens == 1:
            pos = state["pos_embed"]
            state["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
            file_prefix_tokens = 2
    elif "dist_token" in state and "dist_token" not in target and "pos_embed" in state:
        state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], state["pos_embed"][:, 2:]], dim=1)
        file_prefix_tokens = 1

    if all(k in state for k in TABLES_2D):
        file_prefix_tokens = _fit_2d_tables(state, encoder, report, file_prefix_tokens)
    elif "pos_embed" in state and encoder.pos_embed is None:
        report.notes.append("pos_embed: the file's 1-D table cannot become the module's row and column tables "
                            "(model.pos_embed=learn2d); build the encoder with model.pos_embed=learn to use it")
    if "pos_embed" in state and "pos_embed" in target:
        state["pos_embed"] = _fit_pos_embed(state["pos_embed"], encoder, file_prefix_tokens, metadata, report)

    kernel_key = "patch_embed.proj.weight"
    if kernel_key in state and kernel_key in target:
        kernel, wanted = state[kernel_key], target[kernel_key].shape
        if kernel.ndim == 2:  # pre-conv timm / manual patchify + linear
            kernel = kernel.reshape(wanted[0], -1, *wanted[2:]) if kernel.numel() == math.prod(wanted) else kernel
            report.resized.append(f"{kernel_key} (linear -> conv)")
        if kernel.ndim == 4 and kernel.shape[-2:] != wanted[-2:]:
            report.resized.append(f"{kernel_key} {shape_text(kernel)} -> {shape_text(wanted)} (FlexiViT resampling)")
            kernel = resample_patch_embed(kernel, list(wanted[-2:]))
        state[kernel_key] = kernel

    return drop_other_heads(encoder, state, report)


def _check_same_architecture(state: Mapping[str, torch.Tensor], encoder: nn.Module) -> None:
    file_depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    file_width = state["blocks.0.norm1.weight"].shape[0] if "blocks.0.norm1.weight" in state else None
    if file_width is None and not file_depth:
        return
    if (file_width, file_depth) != (encoder.embed_dim, len(encoder.blocks)):
        raise CheckpointError(f"the file holds a ViT with embed_dim={file_width} and depth={file_depth}, the "
                              f"module has embed_dim={encoder.embed_dim} and depth={len(encoder.blocks)}: "
                              "set model.arch (or model.embed_dim / depth / num_heads) to the file's")


def _grid_of(num_tokens: int, metadata: Mapping[str, str], module_grid: tuple[int, int]) -> tuple[int, int]:
    """The patch grid a file's position embedding was trained on."""
    if "encoder" in metadata:  # our exports record it
        config = json.loads(metadata["encoder"])
        stride = config["patch_size"] * (config["backbone_stride"] if config.get("patch_embed") == "hybrid" else 1)
        grid = (config["img_size"][0] // stride, config["img_size"][1] // stride)
        if grid[0] * grid[1] == num_tokens:
            return grid
    if module_grid[0] * module_grid[1] == num_tokens:
        return module_grid
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise CheckpointError(f"cannot tell the grid of a position embedding with {num_tokens} patch tokens "
                              "(not square); resample it yourself with timm.layers.resample_abs_pos_embed")
    return side, side


def _fit_pos_embed(pos: torch.Tensor, encoder: nn.Module, file_prefix_tokens: int,
                   metadata: Mapping[str, str], report: LoadReport) -> torch.Tensor:
    wanted_prefix = encoder.num_prefix_tokens
    if file_prefix_tokens != wanted_prefix:
        raise CheckpointError(f"pos_embed: the file has {file_prefix_tokens} prefix tokens, the module "
                              f"{wanted_prefix}; check model.class_token / model.dist_token / model.reg_tokens")
    new_grid = tuple(encoder.grid_size)
    old_grid = _grid_of(pos.shape[1] - file_prefix_tokens, metadata, new_grid)
    if old_grid == new_grid:
        return pos
    if not isinstance(encoder.pos_embed, nn.Parameter):
        # A fixed sin-cos table is a function of the grid: recompute it rather than interpolate.
        report.resized.append(f"pos_embed grid {old_grid} -> {new_grid} (fixed sin-cos, recomputed)")
        return sincos_2d_pos_embed(encoder.embed_dim, new_grid, wanted_prefix)
    report.resized.append(f"pos_embed grid {old_grid} -> {new_grid} (bicubic, as timm)")
    return resample_abs_pos_embed(pos, new_size=list(new_grid), old_size=list(old_grid),
                                  num_prefix_tokens=wanted_prefix)


def _fit_2d_tables(state: dict[str, torch.Tensor], encoder: nn.Module, report: LoadReport,
                   file_prefix_tokens: int) -> int:
    """A file's learned row and column tables: resampled along their axis (linear) to the module's grid,
    or, for an encoder with a 1-D table, written out as that table (the module's prefix tokens at
    zero: they had no position): the same embeddings, so the same features at the file's grid.
    Returns the number of prefix tokens the file's position table now covers."""
    rows, cols = state["pos_embed_row"], state["pos_embed_col"]
    if encoder.pos_embed is not None:
        prefix = encoder.num_prefix_tokens
        state["pos_embed"] = torch.cat([rows.new_zeros(1, prefix, rows.shape[-1] * 2), learned_2d_table(rows, cols)], 1)
        del state["pos_embed_row"], state["pos_embed_col"]
        report.resized.append("pos_embed (from the file's 2-D row and column tables)")
        return prefix
    for key, wanted in zip(TABLES_2D, encoder.grid_size):
        table = state[key]                                                       # [1, n, D/2]
        if table.shape[1] != wanted:
            report.resized.append(f"{key} {table.shape[1]} -> {wanted} positions (linear)")
            state[key] = F.interpolate(table.transpose(1, 2), size=wanted, mode="linear",
                                       align_corners=False).transpose(1, 2)
    return file_prefix_tokens


def timm_equivalent(config: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The timm model name and keyword arguments that rebuild an encoder with this config."""
    if config.get("patch_embed") == "hybrid":
        return None  # timm's hybrids take a module, not a name: rebuild with ssl_vit.create_encoder
    if config.get("pos_embed") == "learn2d":
        return None  # timm's ViT has no row and column tables: rebuild with ssl_vit.create_encoder
    name = "deit_base_distilled_patch16_224" if config["dist_token"] else "vit_base_patch16_224"
    kwargs = dict(img_size=list(config["img_size"]), patch_size=config["patch_size"], in_chans=config["in_chans"],
                  embed_dim=config["embed_dim"], depth=config["depth"], num_heads=config["num_heads"],
                  mlp_ratio=config["mlp_ratio"], qkv_bias=config["qkv_bias"], class_token=config["class_token"],
                  global_pool=config["global_pool"],
                  fc_norm=config["global_pool"] == "avg" if config["fc_norm"] is None else config["fc_norm"],
                  init_values=config["layer_scale_init"], num_classes=config["num_classes"])
    if config.get("reg_tokens"):
        kwargs["reg_tokens"] = config["reg_tokens"]  # timm's VisionTransformer(reg_tokens=N): the same layout
    return dict(model_name=name, kwargs=kwargs)


def _registers(state: Mapping[str, torch.Tensor]) -> int:
    return state["reg_token"].shape[1] if "reg_token" in state else 0


def config_from_state(state: Mapping[str, torch.Tensor], num_heads: Optional[int] = None,
                      recipe: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """A foreign ViT's build settings (`model:` keys) read from its tensors. The number of heads,
    which shapes cannot tell, comes from `num_heads` (the command line), else from the named size
    with that width and depth, else from a `recipe` (model: section) of that width; a ValueError
    says what is missing."""
    kernel = state.get("patch_embed.proj.weight")
    if kernel is None or kernel.ndim != 4 or "blocks.0.norm1.weight" not in state:
        raise ValueError("not a ViT with a convolutional patch embedding whose architecture can be read from "
                         "its tensors; give recipe=... with its model.* settings")
    if "blocks.0.attn.q_bias" in state or "blocks.0.gamma_1" in state:
        raise ValueError("a BEiT-style ViT (q/v biases, gamma_1 layer scale): the beit encoder family reads it")
    embed_dim, in_chans, patch = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    prefix = int("cls_token" in state) + int("dist_token" in state) + _registers(state)
    found = dict(embed_dim=embed_dim, depth=depth, patch_size=patch, in_chans=in_chans,
                 class_token="cls_token" in state, dist_token="dist_token" in state, reg_tokens=_registers(state),
                 global_pool="avg" if "fc_norm.weight" in state else "token",
                 num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
                 pos_embed="sincos" if "decoder_pred.weight" in state else "learn")  # MAE: fixed sin-cos
    if "blocks.0.ls1.gamma" in state:
        found["layer_scale_init"] = 1.0e-5  # any value builds the LayerScale; the file's gamma is loaded
    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[1] - prefix
        if math.isqrt(tokens) ** 2 == tokens:
            found["img_size"] = math.isqrt(tokens) * patch
    elif all(k in state for k in TABLES_2D):
        found["pos_embed"] = "learn2d"
        found["img_size"] = [state["pos_embed_row"].shape[1] * patch, state["pos_embed_col"].shape[1] * patch]
    named = [name for name, arch in ARCHS.items() if (arch["embed_dim"], arch["depth"]) == (embed_dim, depth)]
    recipe = recipe or {}
    recipe_width = recipe.get("embed_dim") or ARCHS.get(recipe.get("arch"), {}).get("embed_dim")
    if named:
        found["arch"] = named[0]
        found["num_heads"] = num_heads or ARCHS[named[0]]["num_heads"]
    elif num_heads:
        found["num_heads"] = num_heads
    elif recipe.get("num_heads") and recipe_width == embed_dim:
        found["num_heads"] = recipe["num_heads"]  # a recipe describing this file
    else:
        raise ValueError(f"a ViT with embed_dim={embed_dim}, depth={depth}, patch {patch} is none of the named "
                         "sizes, so its number of heads is unknown: give model.num_heads=N")
    return found
