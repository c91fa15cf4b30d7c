"""The mask generators against their references' statistics: SimMIM's random masking (exact counts, whole
mask cells, uniform cells) and BEiT's blockwise masking (against an independent transcription of unilm's
beit/masking_generator.py: the number masked, never above the budget; rectangles of the right sizes)."""
import math
import random
import statistics

import pytest
import torch

from ssl_vit.tasks.masking import BlockwiseMaskGenerator, RandomMaskGenerator


# -------------------------------------------------------------------------------------------
# SimMIM's random masking


@pytest.mark.parametrize("grid, patch, mask_patch, cells, masked", [
    ((14, 14), 16, 32, (7, 7), 30),       # the paper's ViT-B: ceil(0.6 x 49) = 30 of 49 cells
    ((8, 8), 4, 8, (4, 4), 10),           # simmim_digits: ceil(0.6 x 16) = 10 of 16
    ((4, 8), 8, 16, (2, 4), 5),           # a non-square grid: ceil(0.6 x 8) = 5
])
def test_random_masking_masks_whole_cells_in_exact_number(grid, patch, mask_patch, cells, masked):
    generator = RandomMaskGenerator(grid, patch, mask_patch_size=mask_patch, mask_ratio=0.6)
    assert generator.cells == cells and generator.num_masked == masked
    mask = generator(64)
    assert mask.shape == (64, grid[0] * grid[1]) and mask.dtype == torch.bool
    scale = mask_patch // patch
    # each mask cell covers scale x scale model patches, all masked or all visible
    by_cell = mask.view(64, cells[0], scale, cells[1], scale).permute(0, 1, 3, 2, 4).flatten(3)  # [B, ch, cw, s*s]
    assert torch.all(by_cell.all(-1) | ~by_cell.any(-1))
    assert torch.all(by_cell[..., 0].flatten(1).sum(1) == masked)
    assert torch.all(mask.sum(1) == masked * scale * scale)


def test_random_masking_draws_every_cell_alike_and_follows_the_generator():
    generator = RandomMaskGenerator((14, 14), 16, 32, 0.6)
    mask = generator(4000, generator=torch.Generator().manual_seed(0)).view(4000, 7, 2, 7, 2)[:, :, 0, :, 0]
    frequency = mask.float().mean(0)                                   # [7, 7], each 30 / 49 in expectation
    assert torch.allclose(frequency, torch.full((7, 7), 30 / 49), atol=0.03)
    first = generator(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, generator(8, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(first, generator(8, generator=torch.Generator().manual_seed(4)))
    torch.manual_seed(5)  # the default generator: the run's RNG, which Accelerate checkpoints
    a = generator(8)
    torch.manual_seed(5)
    assert torch.equal(a, generator(8))


@pytest.mark.parametrize("mask_patch", [12, 48, 2])
def test_random_masking_rejects_cells_that_do_not_tile_the_grid(mask_patch):
    with pytest.raises(ValueError, match=f"mask_patch_size={mask_patch} must be a multiple"):
        RandomMaskGenerator((8, 8), 4, mask_patch_size=mask_patch)


# -------------------------------------------------------------------------------------------
# BEiT's blockwise masking


def reference_blockwise(rng: random.Random, height=14, width=14, num_masking_patches=75, min_num_patches=16,
                        min_aspect=0.3):
    """unilm beit/masking_generator.py `MaskingGenerator`, written out plainly (Python's random).
    Returns the mask (lists) and the areas of the rectangles that were added."""
    mask = [[0] * width for _ in range(height)]
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count, areas = 0, []
    while count < num_masking_patches:
        budget = num_masking_patches - count
        delta = 0
        for _ in range(10):
            target = rng.uniform(min_num_patches, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                already = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - already <= budget:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i][j]:
                                mask[i][j], delta = 1, delta + 1
                    areas.append(h * w)
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask, areas


def test_blockwise_masks_as_many_as_beit_and_never_more():
    samples = 600
    ours = BlockwiseMaskGenerator((14, 14), num_mask_patches=75, min_num_patches=16)(
        samples, generator=torch.Generator().manual_seed(0)).sum(1).tolist()
    rng = random.Random(0)
    reference = [sum(map(sum, reference_blockwise(rng)[0])) for _ in range(samples)]
    assert max(ours) <= 75 and max(reference) <= 75
    # the reference averages about 74.5 masked patches (std about 1): the same distribution
    assert statistics.mean(ours) == pytest.approx(statistics.mean(reference), abs=0.3)
    assert statistics.mean(ours) > 73.5
    assert sum(c == 75 for c in ours) / samples == pytest.approx(sum(c == 75 for c in reference) / samples, abs=0.1)


def test_each_block_is_a_rectangle_of_beits_size_and_shape():
    generator = BlockwiseMaskGenerator((14, 14), num_mask_patches=75, min_num_patches=16)
    torch_rng = torch.Generator().manual_seed(1)
    areas = []
    for _ in range(400):  # one block on an empty grid: the newly masked patches are the rectangle
        mask = torch.zeros(14, 14, dtype=torch.bool)
        added = generator.add_block(mask, 75, torch_rng)
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert added == h * w == int(mask.sum())                              # a full rectangle
        assert rows.max() - rows.min() + 1 == h and cols.max() - cols.min() + 1 == w
        assert h < 14 and w < 14
        # area >= 16 and aspect in [0.3, 1/0.3] before rounding h and w: at least 12 patches after
        assert 12 <= h * w <= 75 and 0.3 / 1.6 <= h / w <= 1.6 / 0.3  # the budget: never more than 75
        areas.append(h * w)
    rng = random.Random(1)
    reference = [reference_blockwise(rng)[1][0] for _ in range(400)]        # the first block of each mask
    assert statistics.mean(areas) == pytest.approx(statistics.mean(reference), rel=0.06)
    assert min(areas) >= min(reference) - 2


def test_blockwise_fallback_when_fewer_than_min_patches_remain():
    """As the reference: with fewer than min_num_patches left, a block may mask fewer new patches
    (overlapping earlier blocks), never more than the budget."""
    generator = BlockwiseMaskGenerator((14, 14), num_mask_patches=75, min_num_patches=16)
    rng = torch.Generator().manual_seed(2)
    for _ in range(50):
        mask = generator.sample(rng)
        budget_mask = mask.clone()
        added = generator.add_block(budget_mask, 5, rng)
        assert 0 <= added <= 5 and int(budget_mask.sum()) == int(mask.sum()) + added


def test_blockwise_masks_follow_the_generator():
    generator = BlockwiseMaskGenerator((14, 14))
    a = generator(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, generator(4, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, generator(4, generator=torch.Generator().manual_seed(8)))
    torch.manual_seed(9)
    b = generator(4)
    torch.manual_seed(9)
    assert torch.equal(b, generator(4)) and b.shape == (4, 196) and b.dtype == torch.bool
    with pytest.raises(ValueError, match="num_mask_patches=200"):
        BlockwiseMaskGenerator((14, 14), num_mask_patches=200)
