"""Cached features as a data set: the linear probe's fast path when the recipe has no augmentation.

Features of the whole split are extracted once (each sample once over all ranks, then gathered on
every rank), so that training a linear head for 90 epochs costs seconds, not 90 passes through the
encoder. Epochs are permutations seeded by (seed, epoch), the same on every rank; each optimizer
step takes the next `global batch` samples and every rank its own micro-batches of them.
"""
from __future__ import annotations

from typing import Iterator

import torch


class FeatureData:
    def __init__(self, features: torch.Tensor, labels: torch.Tensor, *, per_device_batch: int, accumulation: int,
                 world_size: int, rank: int, steps_per_epoch: int, seed: int = 0):
        self.features, self.labels = features, labels
        self.per_device_batch, self.accumulation = per_device_batch, accumulation
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.steps_per_epoch = steps_per_epoch
        self.batches_per_epoch = steps_per_epoch * accumulation
        self.global_batch = per_device_batch * accumulation * world_size

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(len(self.labels), generator=generator)
        first_step = skip_batches // self.accumulation
        for step in range(first_step, self.steps_per_epoch):
            chosen = order[step * self.global_batch:(step + 1) * self.global_batch]
            for micro in range(self.accumulation):
                start = (micro * self.world_size + self.rank) * self.per_device_batch
                index = chosen[start:start + self.per_device_batch].to(self.labels.device)
                yield {"features": self.features[index], "labels": self.labels[index]}


def split_for_rank(features: torch.Tensor, labels: torch.Tensor, *, rank: int, world_size: int,
                   batch_size: int) -> Iterator[dict]:
    """This rank's share (every world_size-th sample) of a gathered split, in batches: summed over
    ranks, each sample is counted once."""
    index = torch.arange(rank, len(labels), world_size, device=labels.device)
    for start in range(0, len(index), batch_size):
        chosen = index[start:start + batch_size]
        yield {"features": features[chosen], "labels": labels[chosen]}
