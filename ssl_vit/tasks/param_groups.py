"""A task's parameter groups, each carrying its multipliers (`lr_scale`, `weight_decay`): the encoder's
(timm's, from its group_matcher and no_weight_decay: layer-wise lr decay, no decay on biases, norms,
tokens and position tables) and the task's own parameters (heads, decoders) at the full lr. The
optimizer and the schedule that applies the multipliers are the run's (run/optim.py)."""
from __future__ import annotations

import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay


def param_groups(encoder: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """timm's groups of an encoder: no weight decay for 1-D parameters (biases, norms) and the names
    its `no_weight_decay()` gives (tokens, position tables, relative position biases); with
    `layer_decay`, one group per layer of its `group_matcher`, lr_scale = layer_decay ** (layers - layer)."""
    skip = sorted(encoder.no_weight_decay()) if hasattr(encoder, "no_weight_decay") else []
    if layer_decay is not None:
        if not hasattr(encoder, "group_matcher"):
            raise ValueError(f"layer decay needs {type(encoder).__name__}.group_matcher(); without it every "
                             "parameter would silently get lr_scale 1.0")
        groups = param_groups_layer_decay(encoder, weight_decay=weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(encoder, weight_decay=weight_decay, no_weight_decay_list=skip)
    return [{"lr_scale": 1.0, **g} for g in groups if g["params"]]


def own_param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float, no_decay: set[str]) -> list[dict]:
    """A task's own parameters (heads, decoders), at the full lr: weight decay except for 1-D ones and `no_decay`."""
    decay = [p for n, p in named if p.ndim > 1 and n not in no_decay]
    keep = [p for n, p in named if p.ndim <= 1 or n in no_decay]
    return [g for g in ({"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
                        {"params": keep, "weight_decay": 0.0, "lr_scale": 1.0}) if g["params"]]
