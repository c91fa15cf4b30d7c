"""Which patches to mask: the mask generators of masked image modelling, on an encoder's patch grid.

    RandomMaskGenerator     SimMIM (Xie et al. 2022 §3.2, data/data_simmim.py `MaskGenerator`):
                            ceil(mask_ratio x cells) cells of a coarse grid of mask_patch_size pixels,
                            drawn uniformly without replacement, each cell then covering its
                            (mask_patch_size / patch_size)^2 model patches
    BlockwiseMaskGenerator  BEiT (Bao et al. 2022 §2.3, Algorithm 1; unilm beit/masking_generator.py):
                            rectangles of at least min_num_patches, aspect ratio log-uniform in
                            [min_aspect, 1 / min_aspect], up to 10 tries each, added until
                            num_mask_patches are masked (never more)

Both return bool masks [B, L] (True = masked, row-major over the grid) and draw from torch's random
numbers only (the default generator, or `generator=`): a run's masks follow from its RNG state, which
Accelerate checkpoints, so a resumed run draws the masks the uninterrupted one would have (as MAE's
`torch.rand` noise).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


class RandomMaskGenerator:
    """SimMIM's random masking. `grid_size` (h, w) is the encoder's patch grid, `patch_size` its
    pixels per patch; `mask_patch_size` must be a multiple of `patch_size` that divides the image."""

    def __init__(self, grid_size: Sequence[int], patch_size: int, mask_patch_size: int = 32,
                 mask_ratio: float = 0.6):
        image = [g * patch_size for g in grid_size]
        if mask_patch_size % patch_size or image[0] % mask_patch_size or image[1] % mask_patch_size:
            raise ValueError(f"mask_patch_size={mask_patch_size} must be a multiple of the {patch_size}-pixel patches "
                             f"and divide the {image[0]}x{image[1]} image")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio} must be in [0, 1)")
        self.grid_size = tuple(grid_size)
        self.scale = mask_patch_size // patch_size                      # model patches per mask cell side
        self.cells = (image[0] // mask_patch_size, image[1] // mask_patch_size)
        self.num_masked = int(math.ceil(self.cells[0] * self.cells[1] * mask_ratio))  # rounded up, as SimMIM

    def __call__(self, batch_size: int, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """bool [B, L]: the same number of masked cells in every sample."""
        cells = self.cells[0] * self.cells[1]
        noise = torch.rand(batch_size, cells, device=device, generator=generator)      # [B, cells]
        chosen = noise.argsort(dim=1)[:, :self.num_masked]                              # a uniform subset
        mask = torch.zeros(batch_size, cells, dtype=torch.bool, device=noise.device).scatter_(1, chosen, True)
        mask = mask.view(batch_size, *self.cells)
        mask = mask.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)    # [B, h, w]
        return mask.flatten(1)                                                           # [B, L]


class BlockwiseMaskGenerator:
    """BEiT's blockwise masking on a patch grid (h, w); BEiT pre-training masks 75 of 196 patches in
    blocks of at least 16 (run_beit_pretraining.py's defaults)."""

    def __init__(self, grid_size: Sequence[int], num_mask_patches: int = 75, min_num_patches: int = 16,
                 max_num_patches: Optional[int] = None, min_aspect: float = 0.3, max_aspect: Optional[float] = None,
                 max_tries: int = 10):
        self.height, self.width = grid_size
        if not 0 < num_mask_patches <= self.height * self.width:
            raise ValueError(f"num_mask_patches={num_mask_patches} must be in 1..{self.height * self.width} (the grid)")
        self.num_mask_patches = num_mask_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_mask_patches if max_num_patches is None else max_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
        self.max_tries = max_tries

    def __call__(self, batch_size: int, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """bool [B, L], at most num_mask_patches masked in each sample (drawn on the CPU)."""
        masks = torch.stack([self.sample(generator) for _ in range(batch_size)])     # [B, h, w]
        return masks.flatten(1).to(device)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One mask [h, w]: blocks are added until num_mask_patches are masked, or until a block
        finds no room in max_tries tries (then the mask stays smaller, as the reference)."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < self.num_mask_patches:
            added = self.add_block(mask, min(self.num_mask_patches - count, self.max_num_patches), generator)
            if added == 0:
                break
            count += added
        return mask

    def add_block(self, mask: torch.Tensor, max_patches: int, generator: Optional[torch.Generator] = None) -> int:
        """Mask one rectangle of target area uniform in [min_num_patches, max_patches] (either way
        round when fewer than min_num_patches remain, as Python's random.uniform) and log-uniform
        aspect ratio, placed uniformly; it counts if it masks between 1 and max_patches new patches.
        Returns how many it masked (0: no try fitted)."""
        for _ in range(self.max_tries):
            u_area, u_aspect, u_top, u_left = torch.rand(4, generator=generator).tolist()
            area = self.min_num_patches + (max_patches - self.min_num_patches) * u_area
            aspect = math.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * u_aspect)
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = int(u_top * (self.height - h + 1))          # uniform in 0..height - h
                left = int(u_left * (self.width - w + 1))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_patches:
                    block.fill_(True)
                    return new
        return 0
