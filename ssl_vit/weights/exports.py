"""Weights out: safetensors exports with a JSON beside them, loadable by timm (and transformers:
weights/hf.py).

    backbone.safetensors + .json    the encoder without classifier heads, timm key names, and the
                                    timm.create_model command that loads it (for families timm has)
    model.safetensors + .json       the whole model: an encoder with its head, or a task's own export
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..models import family_of
from ..models.files import FORMAT
from ..tasks import Task




def export_backbone(encoder: nn.Module, path: Union[str, Path], *, extra: Optional[dict] = None) -> Path:
    """The encoder without classifier heads, timm key names: `timm.create_model(<name>,
    pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path), **kwargs)` (see the JSON).
    `extra` goes into the JSON (the training loop records the input normalisation there, which the
    evaluation tools adopt)."""
    family = family_of(encoder)
    config = {**encoder.config, "num_classes": 0}
    return _save(family.backbone_state(encoder), path, kind="backbone", encoder_config=config,
                 timm_cfg=family.timm_equivalent(config), extra=extra)


def export_model(module: nn.Module, path: Union[str, Path], *, extra: Optional[dict] = None,
                 evaluation: Optional[dict] = None) -> Path:
    """The whole model as one safetensors file: an encoder with its head, or a task's own export
    (`export_state(evaluation)`: MAE with its decoder in the official layout, a linear probe with the
    head its evaluation chose folded in), and the task's other files (a tokenizer) beside it."""
    if isinstance(module, Task):
        export = module.export_state(evaluation)
        state, config, timm_loadable = export.state, export.encoder_config, export.timm_loadable
        family = family_of(module.encoder)
        for name, write in export.files.items():
            write(Path(path).parent / name)
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
    json_path = path.with_suffix(".json")
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(description, indent=2) + "\n")
    os.replace(tmp, json_path)  # a kill mid-write never leaves a cut description (a re-run reads its step)
    return path


def _portable(path: Path) -> str:
    """The file as the command should name it: relative to the current folder when it lies inside it
    (runs/x/backbone.safetensors, as users type it, and valid wherever the checkout moves), else absolute."""
    absolute = path.resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(absolute)
