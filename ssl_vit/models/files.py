"""Reading weight files, never running code from them, and loading tensors into a model.

    read_checkpoint(path)           the stored object and its metadata: safetensors, or torch files
                                    read with weights_only=True (a pickle that would build anything
                                    but tensors is refused, naming what it asks for)
    unwrap(checkpoint)              the flat {name: tensor} dict inside a training checkpoint
    export_description(path)        the JSON beside one of our exports; encoder_config_of(path): its
                                    encoder's config, from the file's metadata
    load_fitted(module, state, ...) tensors already fitted to the module's shapes, loaded and reported
    load_model_weights(model, ...)  a whole model's file (an encoder of ours, a timm classifier: DeiT's
                                    teacher) fitted by its family and loaded

Loading into a task, with the file formats tasks own (official MAE with its decoder), is
weights/loading.py's `load_weights`, above the tasks.
"""
from __future__ import annotations

import argparse
import json
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from timm.models import clean_state_dict

from ..config import CheckpointError
from .base import LoadReport, family_of, shape_text

FORMAT = "ssl_vit"  # the metadata "format" of our exports




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
        for key in ("model", "state_dict", "module", "teacher"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                if key == "teacher":  # DINO's full checkpoints: the teacher is what DINO evaluates and releases
                    notes.append("DINO's full checkpoint: the teacher's weights (the student's are under 'student')")
                break
        if ema_keys:
            notes.append(f"the file also holds EMA weights ({ema_keys[0]!r}); load them with use_ema=True")
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no tensors found; top-level keys: {sorted(map(str, checkpoint))[:10]}")
    return clean_state_dict(tensors), notes


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



def load_fitted(module: nn.Module, state: dict[str, torch.Tensor], report: LoadReport, *,
                strict: bool = False) -> LoadReport:
    """Load tensors already fitted to `module` (by its family's and its task's fit_state_dict): a
    shape that still differs is an error; the report records what loaded, what was missing and what
    was unexpected; `strict`: every tensor on both sides must match."""
    target = module.state_dict()
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
    return report


def load_model_weights(model: nn.Module, path_or_state_dict: Union[str, Path, Mapping[str, torch.Tensor]], *,
                       strict: bool = True) -> LoadReport:
    """A whole model's weights (one of our encoders, a timm model) from a file or a state dict, fitted
    by the model's family (position grids, heads) and loaded; no task format is consulted."""
    if isinstance(path_or_state_dict, (str, Path)):
        source = str(path_or_state_dict)
        checkpoint, metadata = read_checkpoint(path_or_state_dict)
    else:
        source, checkpoint, metadata = "a state dict", path_or_state_dict, {}
    state, notes = unwrap(checkpoint)
    report = LoadReport(source=source, format="ssl_vit export" if metadata.get("format") == FORMAT else "a state dict",
                        notes=notes)
    return load_fitted(model, family_of(model).fit_state_dict(model, state, metadata, report), report, strict=strict)
