"""Weights in and out: our safetensors exports, timm state dicts, official MAE and DeiT checkpoints.

    file --read_checkpoint--> (state dict, metadata)      never unpickles code (weights_only=True)
         --unwrap-----------> flat tensors                {'model': ...}, {'state_dict': ...}, EMA on request
         --convert_<format>-> timm key names              one converter per foreign format
         --fit_to-----------> the module's shapes         position-embedding grid, patch kernel, heads
         --load_state_dict--> LoadReport                  loaded / missing / unexpected / resized

All formats share timm's `VisionTransformer` key names for the encoder, so "converting" is mostly
recognising what a file holds (an MAE decoder, a distillation token, an old 2-D patch kernel) and
deciding what to do with the parts the target module does not have.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import clean_state_dict

from .models.vit import VisionTransformer, sincos_2d_pos_embed

FORMAT = "ssl_vit"
MAE_DECODER_PREFIXES = ("decoder_", "mask_token")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


@dataclass
class LoadReport:
    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)       # in the module, not in the file: left as initialised
    unexpected: list[str] = field(default_factory=list)    # in the file, not used
    resized: list[str] = field(default_factory=list)       # loaded after resampling or conversion
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.format})"]
        for title, items in (("resized", self.resized), ("missing (left as initialised)", self.missing),
                             ("unexpected (ignored)", self.unexpected)):
            if items:
                lines.append(f"  {title}: {_compact(items)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------
# reading


def read_checkpoint(path: Union[str, Path]) -> tuple[Any, dict[str, str]]:
    """The object stored in `path` and its metadata, without running any code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    if path.suffix == ".npz":
        raise CheckpointError(f"{path} is a JAX/Flax .npz file: load it with timm "
                              "(timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))) "
                              "and pass the model's state_dict() to load_weights")
    try:
        # argparse.Namespace holds the training arguments of MAE, DeiT and timm checkpoints;
        # it carries plain values only.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            unsafe = []
        what = f" It asks to import {', '.join(unsafe)}." if unsafe else ""
        raise CheckpointError(
            f"refused to load {path}: it is a pickle that would run code or build objects other than "
            f"tensors, and only weights are loaded (torch.load(weights_only=True)).{what} If you trust "
            "the file, extract its state dict in a separate Python session and save it with "
            "safetensors.torch.save_file.") from e
    except RuntimeError as e:
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {str(e).splitlines()[0]}") from e


def unwrap(checkpoint: Any, *, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The flat {name: tensor} dict inside a training checkpoint, and notes on what else it held."""
    notes = []
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"expected a dict of tensors, found a {type(checkpoint).__name__}")
    ema_keys = [k for k in ("model_ema", "state_dict_ema") if isinstance(checkpoint.get(k), Mapping)]
    if use_ema:
        if not ema_keys:
            raise CheckpointError("use_ema=True but the file holds no EMA weights (model_ema / state_dict_ema)")
        checkpoint, key = checkpoint[ema_keys[0]], ema_keys[0]
        notes.append(f"using the EMA weights under {key!r}")
    else:
        for key in ("model", "state_dict", "module"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
        if ema_keys:
            notes.append(f"the file also holds EMA weights ({ema_keys[0]!r}); load them with use_ema=True")
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no tensors found; top-level keys: {sorted(map(str, checkpoint))[:10]}")
    return clean_state_dict(tensors), notes


# -------------------------------------------------------------------------------------------
# one converter per format, recognised by key names


def detect_format(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    if metadata.get("format") == FORMAT:
        return f"ssl_vit {metadata.get('kind', 'export')}"
    if any(k.startswith(MAE_DECODER_PREFIXES) for k in state):
        return "official MAE (with decoder)"
    if "dist_token" in state:
        return "DeiT distilled"
    if "pos_embed" in state or any(k.startswith("blocks.") for k in state):
        return "timm / DeiT / MAE encoder"
    return "unrecognised"


def convert_timm(state: dict[str, torch.Tensor], module: nn.Module, report: LoadReport) -> dict[str, torch.Tensor]:
    """timm, DeiT and MAE encoders share names; old timm files stored the patch kernel as a linear."""
    out = {}
    for key, value in state.items():
        if key.startswith("pre_logits."):  # the ViT paper's representation layer, unused by timm since 2021
            report.unexpected.append(key)
            continue
        out[key] = value
    return out


def convert_mae(state: dict[str, torch.Tensor], module: nn.Module, report: LoadReport) -> dict[str, torch.Tensor]:
    """Official MAE: the decoder (`decoder_*`, `mask_token`) is kept only for an MAE module.
    MAE fine-tuning drops the pre-training `norm` for a fresh `fc_norm` (main_finetune.py)."""
    module_keys = set(module.state_dict())
    wants_decoder = any(k.startswith(MAE_DECODER_PREFIXES) for k in module_keys)
    out = {}
    for key, value in state.items():
        if key.startswith(MAE_DECODER_PREFIXES) and not wants_decoder:
            report.unexpected.append(key)
            continue
        out[key] = value
    dropped = [k for k in report.unexpected if k.startswith(MAE_DECODER_PREFIXES)]
    if dropped:
        report.notes.append(f"the MAE decoder ({len(dropped)} tensors) is not part of this module and was ignored")
    return convert_timm(out, module, report)


CONVERTERS = {"official MAE (with decoder)": convert_mae}


# -------------------------------------------------------------------------------------------
# fitting a state dict to the module's shapes


def _encoder_of(module: nn.Module) -> tuple[VisionTransformer, str]:
    if isinstance(module, VisionTransformer):
        return module, ""
    encoder = getattr(module, "encoder", None)
    if isinstance(encoder, VisionTransformer):
        return encoder, "encoder."
    raise CheckpointError(f"load_weights needs a ssl_vit VisionTransformer or a task with .encoder, "
                          f"got {type(module).__name__}")


def _holds_our_encoder(module: nn.Module) -> bool:
    return isinstance(module, VisionTransformer) or isinstance(getattr(module, "encoder", None), VisionTransformer)


def _load_other_model(module: nn.Module, state: dict[str, torch.Tensor], report: LoadReport, *, strict: bool,
                      verbose: bool) -> LoadReport:
    """Any other model (a timm model trained with model.arch=timm:NAME, alone or as a task's
    `.encoder`): same key names, classifiers of another size dropped, the rest must match."""
    target = module.state_dict()
    prefix = "encoder." if hasattr(module, "encoder") else ""
    state = _place_keys(state, set(target), prefix)
    if not prefix:  # a task's own state (keys under encoder.) into the bare model
        state = {(k[len("encoder."):] if k.startswith("encoder.") and k[len("encoder."):] in target else k): v
                 for k, v in state.items()}
    for key in list(state):
        if key in target and state[key].shape != target[key].shape:
            if state[key].ndim <= 2 and key.rsplit(".", 2)[-2] in ("fc", "head", "classifier", "last_linear"):
                report.notes.append(f"{key}: the file's classifier has another size; the module keeps its own")
                del state[key]
            else:
                raise CheckpointError(f"{key}: file has shape {_shape(state[key])} but the module needs "
                                      f"{_shape(target[key])}; is model.arch right?")
    return _load_and_report(module, state, report, strict=strict, verbose=verbose)


def _load_and_report(module: nn.Module, state: dict[str, torch.Tensor], report: LoadReport, *, strict: bool,
                     verbose: bool) -> LoadReport:
    target = module.state_dict()
    result = module.load_state_dict(state, strict=False)
    report.loaded = [k for k in state if k in target]
    report.missing += list(result.missing_keys)
    report.unexpected += list(result.unexpected_keys)
    if strict and (report.missing or report.unexpected):
        raise CheckpointError("strict load failed:\n" + report.summary())
    if verbose and int(os.environ.get("RANK", "0")) == 0:
        print(report.summary())
    return report


def _place_keys(state: dict[str, torch.Tensor], module_keys: set[str], prefix: str) -> dict[str, torch.Tensor]:
    """Encoder keys may sit under `encoder.` in a task module; the decoder's at the top."""
    placed = {}
    for key, value in state.items():
        if key not in module_keys and prefix + key in module_keys:
            key = prefix + key
        placed[key] = value
    return placed


def _grid_of(num_tokens: int, metadata: Mapping[str, str], module_grid: tuple[int, int]) -> tuple[int, int]:
    """The patch grid a file's position embedding was trained on."""
    if "encoder" in metadata:  # our exports record it
        config = json.loads(metadata["encoder"])
        stride = config["patch_size"] * (config["backbone_stride"] if config["patch_embed"] == "hybrid" else 1)
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


def fit_to(state: dict[str, torch.Tensor], module: nn.Module, metadata: Mapping[str, str],
           report: LoadReport) -> dict[str, torch.Tensor]:
    """Make the file's tensors fit the module: prefix tokens, position grid, patch kernel, heads."""
    encoder, prefix = _encoder_of(module)
    target = module.state_dict()
    state = _place_keys(state, set(target), prefix)
    _check_same_architecture(state, encoder, prefix)
    cls_key, dist_key, pos_key = prefix + "cls_token", prefix + "dist_token", prefix + "pos_embed"
    file_prefix_tokens = int(cls_key in state) + int(dist_key in state)

    # DeiT: a distillation token for an encoder that had none starts as the class token (§4).
    if dist_key in target and dist_key not in state and cls_key in state:
        state[dist_key] = state[cls_key].clone()
        report.resized.append(f"{dist_key} (initialised from the class token, with its position embedding)")
        if pos_key in state and file_prefix_tokens == 1:
            pos = state[pos_key]
            state[pos_key] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
            file_prefix_tokens = 2
    elif dist_key in state and dist_key not in target and pos_key in state:
        state[pos_key] = torch.cat([state[pos_key][:, :1], state[pos_key][:, 2:]], dim=1)
        file_prefix_tokens = 1

    if pos_key in state and pos_key in target:
        state[pos_key] = _fit_pos_embed(state[pos_key], encoder, file_prefix_tokens, metadata, pos_key, report)
    if prefix + "decoder_pos_embed" in state and prefix + "decoder_pos_embed" in target:
        key = prefix + "decoder_pos_embed"
        if state[key].shape != target[key].shape:
            state[key] = target[key].clone()  # the decoder's table is fixed sin-cos: recompute for this grid
            report.resized.append(f"{key} (fixed sin-cos, recomputed for grid {encoder.grid_size})")

    kernel_key = prefix + "patch_embed.proj.weight"
    if kernel_key in state and kernel_key in target:
        kernel, wanted = state[kernel_key], target[kernel_key].shape
        if kernel.ndim == 2:  # pre-conv timm / manual patchify + linear
            kernel = kernel.reshape(wanted[0], -1, *wanted[2:]) if kernel.numel() == math.prod(wanted) else kernel
            report.resized.append(f"{kernel_key} (linear -> conv)")
        if kernel.ndim == 4 and kernel.shape[-2:] != wanted[-2:]:
            report.resized.append(f"{kernel_key} {_shape(kernel)} -> {_shape(wanted)} (FlexiViT resampling)")
            kernel = resample_patch_embed(kernel, list(wanted[-2:]))
        state[kernel_key] = kernel

    for key in list(state):  # classifier heads of another size are dropped, as timm and MAE do
        if key in target and state[key].shape != target[key].shape:
            if key.startswith((prefix + "head.", prefix + "head_dist.")):
                if key.endswith(".weight"):
                    report.notes.append(f"{key[:-7]}: the file's has {state[key].shape[0]} outputs, the module's "
                                        f"{target[key].shape[0]}; the module keeps its own (new) head")
                del state[key]
            else:
                raise CheckpointError(f"{key}: file has shape {_shape(state[key])} but the module needs "
                                      f"{_shape(target[key])}; is the recipe's model.arch / embed_dim right?")
    return state


def _check_same_architecture(state: Mapping[str, torch.Tensor], encoder: VisionTransformer, prefix: str) -> None:
    width_key = prefix + "blocks.0.norm1.weight"
    file_depth = len({k.split(".")[1 + bool(prefix)] for k in state if k.startswith(prefix + "blocks.")})
    file_width = state[width_key].shape[0] if width_key in state else None
    if file_width is None and not file_depth:
        return
    if (file_width, file_depth) != (encoder.embed_dim, len(encoder.blocks)):
        raise CheckpointError(f"the file holds a ViT with embed_dim={file_width} and depth={file_depth}, the "
                              f"module has embed_dim={encoder.embed_dim} and depth={len(encoder.blocks)}: "
                              "set model.arch (or model.embed_dim / depth / num_heads) to the file's")


def _fit_pos_embed(pos: torch.Tensor, encoder: VisionTransformer, file_prefix_tokens: int,
                   metadata: Mapping[str, str], key: str, report: LoadReport) -> torch.Tensor:
    wanted_prefix = encoder.num_prefix_tokens
    if file_prefix_tokens != wanted_prefix:
        raise CheckpointError(f"{key}: the file has {file_prefix_tokens} prefix tokens, the module "
                              f"{wanted_prefix}; check model.class_token / model.dist_token")
    new_grid = tuple(encoder.grid_size)
    old_grid = _grid_of(pos.shape[1] - file_prefix_tokens, metadata, new_grid)
    if old_grid == new_grid:
        return pos
    if not isinstance(encoder.pos_embed, nn.Parameter):
        # A fixed sin-cos table is a function of the grid: recompute it rather than interpolate.
        report.resized.append(f"{key} grid {old_grid} -> {new_grid} (fixed sin-cos, recomputed)")
        return sincos_2d_pos_embed(encoder.embed_dim, new_grid, wanted_prefix)
    report.resized.append(f"{key} grid {old_grid} -> {new_grid} (bicubic, as timm)")
    return resample_abs_pos_embed(pos, new_size=list(new_grid), old_size=list(old_grid),
                                  num_prefix_tokens=wanted_prefix)


# -------------------------------------------------------------------------------------------
# the public entry point


def load_weights(module: nn.Module, path_or_state_dict: Union[str, Path, Mapping[str, torch.Tensor]], *,
                 strict: bool = False, use_ema: bool = False, verbose: bool = True) -> LoadReport:
    """Load our exports, timm state dicts, official MAE or DeiT checkpoints into an encoder (or a task
    holding one as `.encoder`). Position embeddings are resampled to the module's grid; classifier
    heads of another size are dropped; `strict=True` raises unless every tensor on both sides matched.
    Prints one summary (on the main process) and returns it as a `LoadReport`."""
    if isinstance(path_or_state_dict, (str, Path)):
        source = str(path_or_state_dict)
        checkpoint, metadata = read_checkpoint(path_or_state_dict)
    else:
        source, checkpoint, metadata = "a state dict", path_or_state_dict, {}
    state, notes = unwrap(checkpoint, use_ema=use_ema)
    report = LoadReport(source=source, format=detect_format(state, metadata), notes=notes)
    if not _holds_our_encoder(module):
        return _load_other_model(module, state, report, strict=strict, verbose=verbose)
    state = CONVERTERS.get(report.format, convert_timm)(state, module, report)
    state = fit_to(state, module, metadata, report)
    # buffers that are functions of the module's shape (sin-cos tables) load like parameters
    return _load_and_report(module, state, report, strict=strict, verbose=verbose)


# -------------------------------------------------------------------------------------------
# exports: safetensors + a JSON config beside, loadable by timm


def export_backbone(encoder: VisionTransformer, path: Union[str, Path], *, extra: Optional[dict] = None) -> Path:
    """The encoder without classifier heads, timm key names: `timm.create_model(<name>,
    pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path), **kwargs)` (see the JSON).
    `extra` goes into the JSON (the training loop records the input normalisation there, which the
    evaluation tools adopt)."""
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith(("head.", "head_dist."))}
    return _save(state, path, kind="backbone", encoder_config={**encoder.config, "num_classes": 0}, extra=extra)


def export_model(module: nn.Module, path: Union[str, Path], *, extra: Optional[dict] = None) -> Path:
    """The whole model as one safetensors file: an encoder with its head, or a task's own export
    (`export_state()`: MAE with its decoder in the official layout, a linear probe's folded head)."""
    if hasattr(module, "export_state"):
        state, encoder_config = module.export_state()
    else:
        encoder, prefix = _encoder_of(module)
        state = {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v
                 for k, v in module.state_dict().items()}
        encoder_config = dict(encoder.config)
    return _save(dict(state), path, kind="model", encoder_config=encoder_config, extra=extra)


def timm_equivalent(config: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The timm model name and keyword arguments that rebuild an encoder with this config."""
    if str(config.get("arch", "")).startswith("timm:"):  # a timm model trained here (model.arch=timm:NAME)
        return dict(model_name=config["arch"].removeprefix("timm:"),
                    kwargs=dict(in_chans=config["in_chans"], num_classes=config["num_classes"]))
    if config.get("patch_embed") == "hybrid":
        return None  # timm's hybrids take a module, not a name: rebuild with ssl_vit.create_encoder
    name = "deit_base_distilled_patch16_224" if config["dist_token"] else "vit_base_patch16_224"
    kwargs = dict(img_size=list(config["img_size"]), patch_size=config["patch_size"], in_chans=config["in_chans"],
                  embed_dim=config["embed_dim"], depth=config["depth"], num_heads=config["num_heads"],
                  mlp_ratio=config["mlp_ratio"], qkv_bias=config["qkv_bias"], class_token=config["class_token"],
                  global_pool=config["global_pool"],
                  fc_norm=config["global_pool"] == "avg" if config["fc_norm"] is None else config["fc_norm"],
                  init_values=config["layer_scale_init"], num_classes=config["num_classes"])
    return dict(model_name=name, kwargs=kwargs)


def _save(state: dict[str, torch.Tensor], path: Union[str, Path], *, kind: str, encoder_config: dict,
          extra: Optional[dict] = None) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"exports are safetensors files: got {path}, use a .safetensors name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "kind": kind, "encoder": json.dumps(encoder_config)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # never leave a half-written export under the real name

    timm_cfg = timm_equivalent(encoder_config)
    description = {"format": FORMAT, "kind": kind, "file": path.name, "encoder": encoder_config, **(extra or {})}
    if timm_cfg is not None and not any(k.startswith(MAE_DECODER_PREFIXES) for k in tensors):
        # pretrained=True with `file` in the overlay loads this local file and nothing else: timm
        # resolves a `file` before any hub id or URL of a plain (not "hf-hub:") model name, so no
        # weights are downloaded (the tests run it with HF_HUB_OFFLINE=1).
        # num_classes in the overlay too: timm then keeps our head and loads strictly (with another
        # num_classes it silently drops the file's classifier and loads non-strictly).
        n = encoder_config["num_classes"]
        args = ", ".join(f"{k}={v!r}" for k, v in timm_cfg["kwargs"].items() if k != "num_classes")
        description["timm"] = timm_cfg
        description["load_with_timm"] = (
            f"timm.create_model({timm_cfg['model_name']!r}, pretrained=True, num_classes={n}, {args}, "
            f"pretrained_cfg_overlay=dict(file={str(path)!r}, num_classes={n}))")
    path.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
    return path


def export_description(path: Union[str, Path]) -> dict:
    """The JSON written beside one of our exports (recipe, task, input normalisation); {} if none."""
    description = Path(path).with_suffix(".json")
    return json.loads(description.read_text()) if description.is_file() else {}


def encoder_config_of(path: Union[str, Path]) -> Optional[dict]:
    """The encoder config stored with one of our exports (None for foreign files)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == FORMAT:
            return json.loads(meta["encoder"])
    return None


def _shape(x) -> str:
    return "x".join(str(s) for s in (x.shape if isinstance(x, torch.Tensor) else x))


def _compact(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
