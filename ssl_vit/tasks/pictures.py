"""Image grids of what a model does, for PNGs (tools/visualize.py) and TensorBoard (tasks' `pictures`).

    reconstruction_grid(task.reconstruct(...))  one row per image: original | masked input |
                                                reconstruction | reconstruction with the visible
                                                patches pasted back (He et al. 2022, figures 2-4)
    attention_grid(images, maps)                one row per image: original | a heat map overlaid
                                                on it for each map of an encoder family's
                                                `attention_maps` ({"mean": [B, h, w], ...})

Grids are float [3, H', W'] in [0, 1]; each tile can be upscaled (nearest, so patches stay sharp)
to make small images such as the 32x32 digits legible. White padding separates the tiles: a grid
of R rows and C columns of S-pixel tiles with padding p is R * (S + p) + p by C * (S + p) + p.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

RECONSTRUCTION_COLUMNS = ("original", "masked", "reconstruction", "pasted")

# matplotlib's "inferno" at 0, 1/4, 1/2, 3/4 and 1: dark where the model does not look, bright where
# it does, and legible in grey scale (matplotlib is not a dependency, five stops are enough)
INFERNO = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]) / 255.0


# -------------------------------------------------------------------------------------------
# reconstructions (MAE, ...)


def reconstruction_grid(pictures: dict[str, torch.Tensor], denormalize: Callable[[torch.Tensor], torch.Tensor],
                        padding: int = 1, scale: int = 1) -> torch.Tensor:
    """One row per image: original | masked input | reconstruction | reconstruction with the visible
    patches pasted back. `pictures` as a task's `reconstruct` returns them (normalised pixels)."""
    rows = [denormalize(pictures[name].float()) for name in RECONSTRUCTION_COLUMNS]  # each [B, 3, H, W]
    return tile_grid(rows, padding=padding, scale=scale)


# -------------------------------------------------------------------------------------------
# attention maps


def attention_grid(images: torch.Tensor, maps: dict[str, torch.Tensor], padding: int = 1, scale: int = 1,
                   alpha: float = 0.6) -> torch.Tensor:
    """One row per image: the image (in [0, 1]) | each map of `attention_maps` overlaid on it."""
    images = images.float().cpu()
    columns = [images] + [overlay(images, values.cpu(), alpha) for values in maps.values()]
    return tile_grid(columns, padding=padding, scale=scale)


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """Heat maps [B, h, w] (each stretched to its own min..max) blended over images [B, 3, H, W].
    Patches are upsampled by repetition, as DINO's attention pictures: each colour is one patch."""
    low = maps.flatten(1).min(dim=1).values.view(-1, 1, 1)
    high = maps.flatten(1).max(dim=1).values.view(-1, 1, 1)
    stretched = (maps - low) / (high - low).clamp_min(1e-12)  # a uniform map is all dark
    heat = F.interpolate(colorize(stretched), size=images.shape[-2:], mode="nearest")
    return (1 - alpha) * images + alpha * heat


def colorize(values: torch.Tensor) -> torch.Tensor:
    """[B, h, w] in [0, 1] -> RGB [B, 3, h, w] on the inferno colour scale."""
    position = values.float().clamp(0, 1) * (len(INFERNO) - 1)
    lower = position.floor().long().clamp(max=len(INFERNO) - 2)
    fraction = (position - lower).unsqueeze(-1)
    rgb = INFERNO[lower] * (1 - fraction) + INFERNO[lower + 1] * fraction      # [B, h, w, 3]
    return rgb.permute(0, 3, 1, 2)


# -------------------------------------------------------------------------------------------
# grids and files


def tile_grid(columns: Sequence[torch.Tensor], padding: int = 1, scale: int = 1) -> torch.Tensor:
    """Columns of images, each [B, 3, H, W] in [0, 1], as a grid of B rows, tiles upscaled `scale`
    times; float [3, B * (H * scale + padding) + padding, C * (W * scale + padding) + padding]."""
    tiles = torch.stack([column.float().cpu() for column in columns], dim=1).flatten(0, 1)  # row-major
    if scale > 1:
        tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    return make_grid(tiles.clamp(0, 1), nrow=len(columns), padding=padding, pad_value=1.0)


def save_png(grid: torch.Tensor, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path))
    return path
