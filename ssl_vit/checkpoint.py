"""Weights in and out: our safetensors exports, timm state dicts, official MAE and DeiT checkpoints.

    file --read_checkpoint--> (state dict, metadata)      never unpickles code (weights_only=True)
         --unwrap-----------> flat tensors                {'model': ...}, {'state_dict': ...}, EMA on request
         --the file's format> converted tensors           formats registered by the tasks and encoders whose
                                                          files they are (official MAE: tasks/mae.py)
         --encoder family---> the encoder's shapes        position-embedding grid, patch kernel, heads
           --and the task---> the task's own shapes       (family.fit_state_dict, task.fit_state_dict)
         --load_state_dict--> LoadReport                  loaded / missing / unexpected / resized

The encoder's keys are timm's, at the top level of a file or under `encoder.` in a task, so loading
is mostly recognising what a file holds and deciding what to do with the parts the target module
does not have. Nothing here knows a particular task or encoder.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models import clean_state_dict

from .models.base import CheckpointError, LoadReport, family_of, shape_text

__all__ = ["CheckpointError", "LoadReport", "load_weights", "read_checkpoint", "unwrap", "register_format",
           "export_backbone", "export_model", "export_description", "encoder_config_of"]

FORMAT = "ssl_vit"
ENCODER = "encoder."


# -------------------------------------------------------------------------------------------
# reading


def read_checkpoint(path: Union[str, Path]) -> tuple[Any, dict[str, str]]:
    """The object stored in `path` and its metadata, without running any code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted copy or download?")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors' own errors (SafetensorError) carry the reason
            raise CheckpointError(f"{path} is not a readable safetensors file ({size} bytes, {_kind_of(path)}): "
                                  f"{str(e).splitlines()[0]}") from None
    if path.suffix == ".npz":
        raise CheckpointError(f"{path} is a JAX/Flax .npz file: load it with timm "
                              "(timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))) "
                              "and pass the model's state_dict() to load_weights")
    kind = _kind_of(path)
    if kind not in ("a PyTorch zip archive", "a pickle"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: it is {kind} ({size} bytes)")
    try:
        # argparse.Namespace holds the training arguments of MAE, DeiT and timm checkpoints;
        # it carries plain values only.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # (torch warns about plain pickles, then refuses them: the refusal below says it all)
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            unsafe = []
        what = f" It asks to import {', '.join(unsafe)}." if unsafe else ""
        raise CheckpointError(
            f"refused to load {path}: it is a pickle that would run code or build objects other than "
            f"tensors, and only weights are loaded (torch.load(weights_only=True)).{what} If you trust "
            "the file, extract its state dict in a separate Python session and save it with "
            "safetensors.torch.save_file.") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} ({kind}, {size} bytes) as a PyTorch checkpoint: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (truncated?)") from None


def _kind_of(path: Path) -> str:
    """What a file is, from its first bytes."""
    head = path.open("rb").read(8)
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip archive"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle"
    if len(head) == 8 and int.from_bytes(head, "little") < 100_000_000:
        return "a safetensors file"  # an 8-byte header length comes first
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file"
    if head.startswith((b"{", b"[")):
        return "JSON or text"
    return "neither a PyTorch archive, a pickle nor safetensors (random bytes?)"


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
# formats, recognised by key names; registered beside the task or encoder whose files they are


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    recognise: Callable[[Mapping[str, torch.Tensor]], bool]
    convert: Callable[[dict, nn.Module, LoadReport], dict]


_FORMATS: list[CheckpointFormat] = []


def register_format(name: str, recognise: Callable[[Mapping[str, torch.Tensor]], bool]):
    """Decorator of a converter `(state, module, report) -> state` for files whose keys `recognise`
    accepts; it decides what to do with the parts of such files `module` has no place for."""
    def decorate(convert):
        _FORMATS[:] = [f for f in _FORMATS if f.name != name] + [CheckpointFormat(name, recognise, convert)]
        return convert
    return decorate


def detect_format(state: Mapping[str, torch.Tensor]) -> Optional[CheckpointFormat]:
    """The registered format whose keys these are (our exports of such models too), or None."""
    return next((f for f in _FORMATS if f.recognise(state)), None)


def _describe_foreign(state: Mapping[str, torch.Tensor]) -> str:
    if "dist_token" in state:
        return "DeiT distilled"
    if "pos_embed" in state or any(k.startswith("blocks.") for k in state):
        return "timm / DeiT / MAE encoder"
    return "timm state dict" if state else "unrecognised"


# -------------------------------------------------------------------------------------------
# the public entry point


def load_weights(module: nn.Module, path_or_state_dict: Union[str, Path, Mapping[str, torch.Tensor]], *,
                 strict: bool = False, use_ema: bool = False, verbose: bool = True,
                 min_encoder_fraction: float = 0.0) -> LoadReport:
    """Load our exports, timm state dicts, official MAE or DeiT checkpoints into an encoder or a task
    (which holds its encoder as `.encoder`). The encoder's family fits the file to the module
    (position embeddings resampled to its grid, classifier heads of another size dropped, ...); keys
    wrapped in a prefix the module does not have (`backbone.`, `student.`) are unwrapped, and said so.
    Loading no tensor at all is an error, and so is loading less than `min_encoder_fraction` of the
    encoder's tensors; `strict=True` raises unless every tensor on both sides matched. Prints one
    summary (on the main process) and returns it as a `LoadReport`."""
    from .tasks.base import Task

    if isinstance(path_or_state_dict, (str, Path)):
        source = str(path_or_state_dict)
        checkpoint, metadata = read_checkpoint(path_or_state_dict)
    else:
        source, checkpoint, metadata = "a state dict", path_or_state_dict, {}
    state, notes = unwrap(checkpoint, use_ema=use_ema)
    task = module if isinstance(module, Task) else None
    encoder = module.encoder if task is not None else module
    family = family_of(encoder)
    state = _unwrap_prefix(state, set(encoder.state_dict()), notes)
    fmt = detect_format(state)
    name = f"ssl_vit {metadata.get('kind', 'export')}" if metadata.get("format") == FORMAT else (
        fmt.name if fmt is not None else _describe_foreign(state))
    report = LoadReport(source=source, format=name, notes=notes)
    _check_recorded_config(metadata, encoder, family, source)
    if fmt is not None:
        state = fmt.convert(state, module, report)

    target = module.state_dict()
    encoder_state, own_state = {}, {}
    for key, value in state.items():  # encoder keys sit at the top of a file, under `encoder.` in a task
        if task is not None and key.startswith(ENCODER):
            encoder_state[key[len(ENCODER):]] = value
        elif task is not None and key in target:
            own_state[key] = value  # the task's own parts (a decoder, heads)
        elif task is None and key.startswith(ENCODER) and key[len(ENCODER):] in target:
            encoder_state[key[len(ENCODER):]] = value  # a task's state into its bare encoder
        else:
            encoder_state[key] = value
    encoder_state = family.fit_state_dict(encoder, encoder_state, metadata, report)
    if task is not None:
        own_state = task.fit_state_dict(own_state, metadata, report)
        state = {**{ENCODER + k: v for k, v in encoder_state.items()}, **own_state}
    else:
        state = encoder_state
    for key, value in state.items():
        if key in target and value.shape != target[key].shape:
            raise CheckpointError(f"{key}: file has shape {shape_text(value)} but the module needs {shape_text(target[key])}")
    # buffers that are functions of the module's shape (sin-cos tables) load like parameters
    result = module.load_state_dict(state, strict=False)
    report.loaded = [k for k in state if k in target]
    report.missing += list(result.missing_keys)
    report.unexpected += list(result.unexpected_keys)
    if strict and (report.missing or report.unexpected):
        raise CheckpointError("strict load failed:\n" + report.summary())
    encoder_keys = [k for k in target if k.startswith(ENCODER)] if task is not None else list(target)
    loaded = len(set(report.loaded) & set(encoder_keys))
    if not report.loaded or loaded < min_encoder_fraction * len(encoder_keys):
        raise CheckpointError(
            f"{source} gave {loaded} of the encoder's {len(encoder_keys)} tensors ({report.format}): its keys "
            f"(e.g. {', '.join(list(state)[:3]) or 'none'}) are not this model's (e.g. "
            f"{', '.join(k[len(ENCODER):] if task is not None else k for k in encoder_keys[:3])}). Is it the right "
            "file and model.arch? To start from it anyway, pass init_partial=true")
    if verbose and int(os.environ.get("RANK", "0")) == 0:
        print(report.summary())
    return report


def _unwrap_prefix(state: dict, encoder_keys: set, notes: list) -> dict:
    """Keys under a prefix the module does not know (mmpretrain's `backbone.`, a teacher-student's
    `student.`): when dropping one first component makes more keys the encoder's, drop it, and say so."""
    def matches(keys) -> int:
        return sum(k in encoder_keys or (k.startswith(ENCODER) and k[len(ENCODER):] in encoder_keys) for k in keys)

    best, best_count = None, matches(state)
    for prefix in {k.split(".", 1)[0] + "." for k in state if "." in k} - {ENCODER}:
        count = matches(k[len(prefix):] for k in state if k.startswith(prefix))
        if count > best_count:
            best, best_count = prefix, count
    if best is None:
        return state
    notes.append(f"the encoder's tensors were under {best!r} in the file: read without it")
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}


def _check_recorded_config(metadata: Mapping[str, str], encoder: nn.Module, family, source: str) -> None:
    """Our exports record how their encoder was built: settings that change the computation but not
    a tensor's shape (the number of attention heads) must agree, or the features would silently differ."""
    if metadata.get("format") != FORMAT or "encoder" not in metadata:
        return
    recorded, built = json.loads(metadata["encoder"]), getattr(encoder, "config", {})
    for key in family.shape_free_keys:
        if key in recorded and key in built and recorded[key] != built[key]:
            raise CheckpointError(f"{source} was trained with {key}={recorded[key]}, the model is built with "
                                  f"{key}={built[key]}: the shapes agree but the features would not; set "
                                  f"model.{key}={recorded[key]}")


# -------------------------------------------------------------------------------------------
# exports: safetensors + a JSON config beside, loadable by timm


def export_backbone(encoder: nn.Module, path: Union[str, Path], *, extra: Optional[dict] = None) -> Path:
    """The encoder without classifier heads, timm key names: `timm.create_model(<name>,
    pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path), **kwargs)` (see the JSON).
    `extra` goes into the JSON (the training loop records the input normalisation there, which the
    evaluation tools adopt)."""
    family = family_of(encoder)
    config = {**encoder.config, "num_classes": 0}
    return _save(family.backbone_state(encoder), path, kind="backbone", encoder_config=config,
                 timm_cfg=family.timm_equivalent(config), extra=extra)


def export_model(module: nn.Module, path: Union[str, Path], *, extra: Optional[dict] = None) -> Path:
    """The whole model as one safetensors file: an encoder with its head, or a task's own export
    (`export_state()`: MAE with its decoder in the official layout, a linear probe's folded head)."""
    from .tasks.base import Task

    if isinstance(module, Task):
        export = module.export_state()
        state, config, timm_loadable = export.state, export.encoder_config, export.timm_loadable
        family = family_of(module.encoder)
    else:
        state, config, timm_loadable, family = module.state_dict(), dict(module.config), True, family_of(module)
    timm_cfg = family.timm_equivalent(config) if timm_loadable else None
    return _save(dict(state), path, kind="model", encoder_config=config, timm_cfg=timm_cfg, extra=extra)


def _save(state: dict[str, torch.Tensor], path: Union[str, Path], *, kind: str, encoder_config: dict,
          timm_cfg: Optional[dict], extra: Optional[dict] = None) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"exports are safetensors files: got {path}, use a .safetensors name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "kind": kind, "encoder": json.dumps(encoder_config)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 600; an export is meant to be shared, as the JSON
    os.replace(tmp, path)  # never leave a half-written export under the real name

    description = {"format": FORMAT, "kind": kind, "file": path.name, "encoder": encoder_config, **(extra or {})}
    if timm_cfg is not None:
        # pretrained=True with `file` in the overlay loads this local file and nothing else: timm
        # resolves a `file` before any hub id or URL of a plain (not "hf-hub:") model name, so no
        # weights are downloaded (the tests run it with HF_HUB_OFFLINE=1).
        # num_classes in the overlay too: timm then keeps our head and loads strictly (with another
        # num_classes it silently drops the file's classifier and loads non-strictly).
        n = encoder_config["num_classes"]
        args = ", ".join(f"{k}={v!r}" for k, v in timm_cfg["kwargs"].items() if k != "num_classes")
        description["timm"] = timm_cfg
        description["load_with_timm"] = (
            f"timm.create_model({timm_cfg['model_name']!r}, pretrained=True, num_classes={n}, "
            f"{args + ', ' if args else ''}pretrained_cfg_overlay=dict(file={_portable(path)!r}, num_classes={n}))")
    path.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
    return path


def _portable(path: Path) -> str:
    """The file as the command should name it: relative to the current folder when it lies inside it
    (runs/x/backbone.safetensors, as users type it, and valid wherever the checkout moves), else absolute."""
    absolute = path.resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(absolute)


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

