"""Pictures of what a model does: MAE reconstructions (and, later, attention maps)."""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.utils import make_grid

RECONSTRUCTION_COLUMNS = ("original", "masked", "reconstruction", "pasted")


def reconstruction_grid(pictures: dict[str, torch.Tensor], denormalize: Callable[[torch.Tensor], torch.Tensor],
                        padding: int = 1) -> torch.Tensor:
    """One row per image: original | masked input | reconstruction | reconstruction with the visible
    patches pasted back. `pictures` as returned by MAE.reconstruct (normalised pixels); returns a
    float [3, H', W'] image in [0, 1]."""
    rows = []
    for i in range(pictures["original"].shape[0]):
        rows += [denormalize(pictures[name][i:i + 1].float())[0] for name in RECONSTRUCTION_COLUMNS]
    return make_grid(torch.stack(rows).cpu(), nrow=len(RECONSTRUCTION_COLUMNS), padding=padding, pad_value=1.0)
