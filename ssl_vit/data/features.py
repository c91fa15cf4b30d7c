"""Features of a split, and cached features as a data set: the linear probe's fast path when the
recipe has no augmentation, and the k-NN memory (eval/metrics.py).

Features of the whole split are extracted once (each sample once over all ranks, then gathered on
every rank), so that training a linear head for 90 epochs costs seconds, not 90 passes through the
encoder. Epochs are permutations seeded by (seed, epoch), the same on every rank; each optimizer
step takes the next `global batch` samples and every rank its own micro-batches of them.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch

# how a training run paces an evaluation's batches: a check for a stop request before each, agreed by
# every rank (run/stops.py, Preemption.rounds); None outside training (tools/knn.py)
Rounds = Optional[Callable[[Iterable[dict]], Iterable[dict]]]


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


@torch.no_grad()
def extract_features(features: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict], *, device,
                     normalize=None, accelerator=None, description: str = "extracting features",
                     rounds: Rounds = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Features, labels and keys of a whole split, gathered from every rank (each sample once),
    sorted by key so that the result does not depend on the number of processes."""
    feats, labels, keys = [], [], []
    for batch in progress(batches, description, accelerator, rounds):
        images = batch["images"].to(device, non_blocking=True)
        feats.append(features(normalize(images) if normalize is not None else images).float())
        labels.append(batch["labels"].to(device))
        keys += list(batch["keys"])
    feats = torch.cat(feats) if feats else torch.zeros(0, 0, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if accelerator is not None and accelerator.num_processes > 1:
        feats, labels, keys = _gather_uneven(feats, labels, keys, accelerator)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    index = torch.tensor(order, dtype=torch.long, device=feats.device)
    return feats[index], labels[index], [keys[i] for i in order]


def progress(batches: Iterable[dict], description: str, accelerator=None, rounds: Rounds = None) -> Iterable[dict]:
    """A progress bar over a pass (images counted), on the main process only; its length is the
    split's size when the loader knows it (this rank's share, times the ranks)."""
    from tqdm import tqdm

    main = accelerator is None or accelerator.is_main_process
    total = getattr(batches, "num_samples", None)
    world = accelerator.num_processes if accelerator is not None else 1
    with tqdm(total=total, desc=description, unit="img", disable=not main, leave=False, dynamic_ncols=True) as bar:
        for batch in (rounds(batches) if rounds is not None else batches):
            yield batch
            bar.update(len(batch["labels"]) * world)


def _gather_uneven(feats: torch.Tensor, labels: torch.Tensor, keys: list[str], accelerator):
    """all_gather of per-rank tensors of different lengths, without padding in the result."""
    from accelerate.utils import gather_object

    sizes = gather_object([feats.shape[0]])
    dim = max(gather_object([feats.shape[1] if feats.numel() else 0]))
    if feats.numel() == 0:
        feats = torch.zeros(0, dim, device=labels.device)
    longest = max(sizes)
    padded = torch.zeros(longest, dim, device=feats.device, dtype=feats.dtype)
    padded[: feats.shape[0]] = feats
    padded_labels = torch.full((longest,), -1, device=labels.device, dtype=labels.dtype)
    padded_labels[: labels.shape[0]] = labels
    all_feats = accelerator.gather(padded).view(len(sizes), longest, dim)
    all_labels = accelerator.gather(padded_labels).view(len(sizes), longest)
    feats = torch.cat([all_feats[r, :n] for r, n in enumerate(sizes)])
    labels = torch.cat([all_labels[r, :n] for r, n in enumerate(sizes)])
    return feats, labels, gather_object(keys)
