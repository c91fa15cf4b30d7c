"""Weights in: our safetensors exports, timm state dicts, official MAE, BEiT and DeiT checkpoints,
into an encoder or a task.

    file --read_checkpoint--> (state dict, metadata)      never unpickles code (weights_only=True)
         --unwrap-----------> flat tensors                {'model': ...}, {'state_dict': ...}, EMA on request
         --the file's format> converted tensors           the one task that claims the file's keys as its
                                                          format (official MAE: tasks/mae.py) keeps what
                                                          the module has a place for
         --encoder family---> the encoder's shapes        position-embedding grid, patch kernel, heads
           --and the task---> the task's own shapes       (family.fit_state_dict, task.fit_state_dict)
         --load_state_dict--> LoadReport                  loaded / missing / unexpected / resized

The encoder's keys are timm's, at the top level of a file or under `encoder.` in a task, so loading
is mostly recognising what a file holds and deciding what to do with the parts the target module
does not have. Nothing here knows a particular task or encoder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

from ..config import CheckpointError
from ..models import LoadReport, family_of
from ..models.files import FORMAT, load_fitted, read_checkpoint, unwrap
from ..tasks import Task, registered_tasks

ENCODER = "encoder."


def claiming_task(state: Mapping[str, torch.Tensor]) -> tuple[Optional[type[Task]], Optional[str]]:
    """The task whose own file format `state` is (by its keys), and the format's name; (None, None) for
    a plain state dict. Two claims are an error (a recogniser to make precise), whatever the order in
    which the tasks were imported."""
    claims = [(task, name) for task in registered_tasks().values() if (name := task.checkpoint_format(state))]
    if len(claims) > 1:
        raise CheckpointError(f"the file is claimed as {' and as '.join(repr(name) for _, name in claims)} (tasks "
                              f"{', '.join(task.name for task, _ in claims)}): their checkpoint_format rules overlap")
    return claims[0] if claims else (None, None)


def _describe_foreign(state: Mapping[str, torch.Tensor]) -> str:
    if "dist_token" in state:
        return "DeiT distilled"
    if "pos_embed" in state or any(k.startswith("blocks.") for k in state):
        return "timm / DeiT / MAE encoder"
    return "timm state dict" if state else "unrecognised"


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
    owner, format_name = claiming_task(state)
    name = f"ssl_vit {metadata.get('kind', 'export')}" if metadata.get("format") == FORMAT else (
        format_name or _describe_foreign(state))
    report = LoadReport(source=source, format=name, notes=notes)
    _check_recorded_config(metadata, encoder, family, source)
    if owner is not None:
        state = owner.convert_checkpoint(state, module, report)

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
    load_fitted(module, state, report, strict=strict)
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
