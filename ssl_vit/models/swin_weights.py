"""Swin weights in and out: timm's, Microsoft's and SimMIM's files fitted to a `Swin` module, its
architecture read from a file's tensors, and the timm command that rebuilds our exports.

Three layouts hold the same tensors:
  - timm's: `layers.<stage>.downsample` starts stages 2-4, the classifier is `head.fc`, the
    relative position index and the shifted windows' attention masks are not saved (buffers
    computed from the window and the grid);
  - Microsoft's (Swin-Transformer `{'model': ...}`, e.g. swin_base_patch4_window7_224.pth):
    `layers.<stage>.downsample` ends stages 1-3, the classifier is `head`, and the index and masks
    are saved;
  - SimMIM's (`{'model': ...}`): Microsoft's encoder under `encoder.` (its mask token included) and
    the one-layer head under `decoder.0.`.
timm's `swin_transformer.checkpoint_filter_fn` converts the last two into the first and resizes
what depends on the window or the patch: each relative position bias table to the module's window
(`resize_rel_pos_bias_table`, the geometric interpolation of BEiT's and SimMIM's fine-tuning) and
the patch kernel. The index and the masks are dropped and rebuilt by the module for its own grid
and window, so SimMIM's 192-px window-6 encoder fine-tunes at 224 px with window 7 (§4.1).
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Any, Mapping, Optional

import torch
from timm.models.swin_transformer import checkpoint_filter_fn

from ..config import CheckpointError
from .base import LoadReport, drop_other_heads, shape_text
from .swin_sizes import ARCHS, WINDOWS

ENCODER = "encoder."
BUFFERS = ("relative_position_index", "attn_mask")   # saved by Microsoft's code, rebuilt here
MICROSOFT_DOWNSAMPLE = "layers.0.downsample.reduction.weight"   # stage 1 ends with patch merging
TABLE = "relative_position_bias_table"
KERNEL = "patch_embed.proj.weight"


def fit_state_dict(encoder, state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """A file's encoder tensors (keys relative to the encoder) -> this module's layout and shapes."""
    state = _without_encoder_prefix(encoder, state, report)
    microsoft = MICROSOFT_DOWNSAMPLE in state
    if microsoft and report.format.startswith(("timm", "unrecognised", "SimMIM")):  # SimMIM's Swin files: Microsoft's keys
        report.format = "Microsoft / SimMIM Swin"
    _check_same_architecture(encoder, state)
    buffers = [k for k in state if k.endswith(BUFFERS)]
    shapes = {k: v.shape for k, v in state.items() if k.endswith((TABLE, KERNEL))}   # names timm keeps
    with warnings.catch_warnings():  # torch's notes on timm's interpolation internals (speed, indexing)
        warnings.filterwarnings("ignore", message=".*(non-contiguous|non-tuple sequence).*")
        state = checkpoint_filter_fn(state, encoder)
    if microsoft:
        report.notes.append("Microsoft's layout (patch merging at the end of stages 1-3, classifier `head`) "
                            "renamed to timm's by timm's checkpoint_filter_fn")
    if buffers:
        report.notes.append(f"{len(buffers)} relative_position_index / attn_mask buffers in the file: rebuilt for "
                            "the module's grid and window")
    for key, value in state.items():
        before = shapes.get(key)
        if before is not None and before != value.shape:
            how = "window" if key.endswith(TABLE) else "patch"
            report.resized.append(f"{key} {shape_text(before)} -> {shape_text(value)} (to the module's {how}, as timm)")
    return drop_other_heads(encoder, state, report)


def _without_encoder_prefix(encoder, state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """SimMIM's files keep the encoder under `encoder.`: `load_weights` strips it from the keys the
    module has, and the rest (Microsoft's stage-end patch merging, buffers, the mask token) are
    stripped here; the one-layer head (`decoder.0.`) stays, unused."""
    prefixed = [k for k in state if k.startswith(ENCODER) and k[len(ENCODER):] not in state]
    if not prefixed:
        return state
    report.notes.append(f"{len(prefixed)} tensors under 'encoder.' (SimMIM's layout) read without it")
    return {(k[len(ENCODER):] if k in prefixed else k): v for k, v in state.items()}


def _check_same_architecture(encoder, state: Mapping[str, torch.Tensor]) -> None:
    """Widths, blocks per stage and heads of the file against the module's, before any tensor is
    fitted: shapes that agree in part would otherwise fail deep inside the resizing."""
    found = _architecture(state)
    if found is None:
        return
    ours = dict(embed_dim=encoder.embed_dim, depths=[len(stage.blocks) for stage in encoder.layers],
                num_heads=[stage.blocks[0].attn.num_heads for stage in encoder.layers])
    theirs = {k: found[k] for k in ours if found.get(k) is not None}
    if any(theirs[k] != ours[k] for k in theirs):
        shown = ", ".join(f"{k}={v}" for k, v in theirs.items())
        raise CheckpointError(f"the file holds a Swin with {shown}; the module has "
                              f"{', '.join(f'{k}={v}' for k, v in ours.items())}: set model.arch (or model.embed_dim / "
                              "depths / num_heads) to the file's")


def _architecture(state: Mapping[str, torch.Tensor]) -> Optional[dict[str, Any]]:
    """What a Swin file's tensors say about its build (either layout), or None if it is no Swin."""
    blocks = [re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k) for k in state]
    blocks = [(int(m[1]), int(m[2])) for m in blocks if m]
    if not blocks:
        return None
    stages = max(s for s, _ in blocks) + 1
    depths = [max((b for s, b in blocks if s == stage), default=-1) + 1 for stage in range(stages)]
    tables = [state.get(f"layers.{stage}.blocks.0.attn.{TABLE}") for stage in range(stages)]
    kernel = state.get("patch_embed.proj.weight")
    return dict(depths=depths, embed_dim=kernel.shape[0] if kernel is not None else None,
                num_heads=[t.shape[1] for t in tables] if all(t is not None for t in tables) else None,
                windows=[(math.isqrt(t.shape[0]) + 1) // 2 for t in tables if t is not None])


def config_from_state(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A foreign Swin file's `model:` keys from its tensors (timm's, Microsoft's or SimMIM's layout;
    tools/visualize.py). The image size is read from Microsoft's saved attention masks when present,
    else taken as the one the window was made for (the last stage one window: window x 32)."""
    if any(k.startswith(ENCODER) for k in state):
        state = {k[len(ENCODER):]: v for k, v in state.items() if k.startswith(ENCODER)}
    found = _architecture(state)
    kernel = state.get("patch_embed.proj.weight")
    if found is None or kernel is None or kernel.ndim != 4 or found["num_heads"] is None:
        raise ValueError("not a Swin Transformer (no layers.<stage>.blocks.<block> keys with relative position "
                         "tables and a convolutional patch embedding)")
    window, patch, stages = found["windows"][0], kernel.shape[-1], len(found["depths"])
    side = window * patch * 2 ** (stages - 1)
    mask = state.get("layers.0.blocks.1.attn_mask")                          # [windows, M^2, M^2]
    if mask is not None and math.isqrt(mask.shape[0]) ** 2 == mask.shape[0]:
        side = math.isqrt(mask.shape[0]) * window * patch
    head = state.get("head.fc.weight", state.get("head.weight"))
    named = [name for name, arch in ARCHS.items()
             if (arch["embed_dim"], arch["depths"], arch["window_size"]) == (found["embed_dim"], found["depths"], window)]
    return dict(arch=named[0] if named else "swin_tiny_patch4_window7", img_size=side, patch_size=patch,
                in_chans=kernel.shape[1], embed_dim=found["embed_dim"], depths=found["depths"],
                num_heads=found["num_heads"], window_size=window,
                num_classes=head.shape[0] if head is not None and head.ndim == 2 else 0)


def timm_equivalent(config: Mapping[str, Any]) -> dict[str, Any]:
    """timm's `SwinTransformer` with our options (timm's checkpoint_filter_fn then loads the file
    strictly): named after the timm model of the same size where there is one."""
    size = config["arch"].split("_")[1]
    window = config["window_size"]
    name = f"swin_{size}_patch4_window{window}_{WINDOWS.get(window)}"
    import timm

    if name not in timm.list_models("swin_*"):
        name = f"swin_{size}_patch4_window7_224" if size in ("tiny", "small", "base", "large") else \
            "swin_tiny_patch4_window7_224"
    kwargs = dict(img_size=list(config["img_size"]), patch_size=config["patch_size"], in_chans=config["in_chans"],
                  embed_dim=config["embed_dim"], depths=list(config["depths"]), num_heads=list(config["num_heads"]),
                  window_size=config["window_size"], mlp_ratio=config["mlp_ratio"], qkv_bias=config["qkv_bias"],
                  num_classes=config["num_classes"])
    return dict(model_name=name, kwargs=kwargs)
