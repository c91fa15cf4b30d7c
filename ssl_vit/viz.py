"""Pictures of what a model does, for PNGs (tools/visualize.py) and TensorBoard (the training loop).

    reconstruction_grid(MAE.reconstruct(...))   one row per image: original | masked input |
                                                reconstruction | reconstruction with the visible
                                                patches pasted back (He et al. 2022, figures 2-4)
    attention_maps(encoder, images)             {"mean": [B, h, w], "head 0": ..., "rollout": ...}
    attention_grid(images, maps)                one row per image: original | a heat map overlaid
                                                on it for each map
    training_pictures(task, images)             what the training loop logs for a task

Grids are float [3, H', W'] in [0, 1]; each tile can be upscaled (nearest, so patches stay sharp)
to make small images such as the 32x32 digits legible. White padding separates the tiles: a grid
of R rows and C columns of S-pixel tiles with padding p is R * (S + p) + p by C * (S + p) + p.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from .attention import AttentionRecorder, attention_rollout, class_token_attention

RECONSTRUCTION_COLUMNS = ("original", "masked", "reconstruction", "pasted")
PICTURE_IMAGES = 8  # images the training loop shows, the same ones every time

# matplotlib's "inferno" at 0, 1/4, 1/2, 3/4 and 1: dark where the model does not look, bright where
# it does, and legible in grey scale (matplotlib is not a dependency, five stops are enough)
INFERNO = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]) / 255.0


# -------------------------------------------------------------------------------------------
# MAE reconstructions


def reconstruction_grid(pictures: dict[str, torch.Tensor], denormalize: Callable[[torch.Tensor], torch.Tensor],
                        padding: int = 1, scale: int = 1) -> torch.Tensor:
    """One row per image: original | masked input | reconstruction | reconstruction with the visible
    patches pasted back. `pictures` as returned by MAE.reconstruct (normalised pixels)."""
    rows = [denormalize(pictures[name].float()) for name in RECONSTRUCTION_COLUMNS]  # each [B, 3, H, W]
    return tile_grid(rows, padding=padding, scale=scale)


# -------------------------------------------------------------------------------------------
# attention maps


@torch.no_grad()
def attention_maps(encoder, images: torch.Tensor, *, layer: int = -1, heads: bool = True,
                   rollout: bool = False) -> dict[str, torch.Tensor]:
    """Where the class token looks, on the patch grid [B, h, w]: in block `layer`, the mean over the
    heads ("mean") and each head ("head i"); with `rollout`, attention rolled out through all the
    blocks (Abnar & Zuidema 2020). `images` are normalised, at the encoder's img_size."""
    if encoder.cls_token is None:
        raise ValueError("attention maps show what the class token attends to, and this encoder has none "
                         "(model.class_token=false)")
    prefix, grid = encoder.num_prefix_tokens, encoder.grid_size
    with AttentionRecorder(encoder, layers=None if rollout else [layer]) as recorder:
        encoder.forward_features(images)
    per_head = class_token_attention(recorder.weights[layer % len(encoder.blocks)], prefix)  # [B, H, L]
    maps = {"mean": per_head.mean(dim=1)}
    if heads:
        maps.update({f"head {h}": per_head[:, h] for h in range(per_head.shape[1])})
    if rollout:
        maps["rollout"] = attention_rollout(recorder.stacked(), prefix)
    return {name: values.reshape(-1, *grid) for name, values in maps.items()}


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


# -------------------------------------------------------------------------------------------
# what the training loop shows


def picture_images(cfg, task, micro: dict) -> Optional[torch.Tensor]:
    """The uint8 images [B, 3, H, W] the training loop pictures, chosen once and kept, to watch the
    same images improve: for an MAE its first training images; for a task that trains its encoder
    (fine-tuning, supervised training) the first validation images; None when there is nothing to
    watch (a linear probe's encoder is frozen: its attention never changes)."""
    if hasattr(task, "reconstruct"):
        return micro["images"][:PICTURE_IMAGES].clone()
    encoder = task.encoder  # (a timm model trained with model.arch=timm:NAME has no class token to picture)
    if getattr(encoder, "cls_token", None) is None or not any(p.requires_grad for p in encoder.parameters()):
        return None
    from .data import build_eval_loader

    batch = next(iter(build_eval_loader(cfg, "val", batch_size=PICTURE_IMAGES)))
    return batch["images"][:PICTURE_IMAGES].clone()


@torch.no_grad()
def training_pictures(task, images: torch.Tensor, denormalize: Callable[[torch.Tensor], torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """{TensorBoard tag: grid} for normalised images: an MAE's reconstructions (under fixed masks),
    or the attention maps of the task's encoder (last block, per head, and rollout)."""
    if hasattr(task, "reconstruct"):
        generator = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.rand(images.shape[0], task.num_patches, generator=generator).to(images.device)
        return {"reconstructions": reconstruction_grid(task.reconstruct(images, noise), denormalize)}
    maps = attention_maps(task.encoder, images, rollout=True)
    return {"attention": attention_grid(denormalize(images), maps)}
