"""Streaming batches from tar shards: every rank the same number of batches, every sample once.

One copy of `ShardStream` runs in each DataLoader worker of each rank; (rank, worker) is its
"slot" among world_size x num_workers slots.

training, epoch e (a fixed number of batches per rank: samples_per_epoch // global batch x accum)
    shard list, shuffled with seed (seed, e, pass)     the same order on every rank, new every epoch
      -> this slot's share: whole shards dealt to balance sample counts, or every slots-th
         sample when shards are few or uneven (see _my_shards)
      -> tar samples (webdataset) -> shuffle buffer (raw bytes, seeded per slot)
      -> skip what a resumed run had already consumed (no decoding)
      -> decode + augment (RNG seeded per sample, so a resumed run sees the same crops), k times
         with repeated augmentation (data.repeated_aug, DeiT), the k views in k consecutive batches
      -> batches of data.batch_size, yielded until this worker's share of the epoch's batches
    A slot that runs out of shards starts its share of the next pass: ranks never wait on each
    other, and DDP never hangs on a rank with fewer batches.
evaluation
    shards in order, this slot's share, each sample exactly once over all ranks, no padding,
    the last batch may be short; metrics are then summed over ranks.

Corrupt images and truncated tars are skipped and counted (a warning for the first and then
every 1000th), without webdataset's sleeping handlers. What cannot go on (a pass over a worker's
shards that yields no image, a sample without the label a run needs) travels to the trainer as a
batch {"error": message}, which the loaders turn into one line (a ConfigError), not a worker's traceback.
"""
from __future__ import annotations

import os
import random
import sys
import zlib
from typing import Callable, Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples
from webdataset.utils import make_seed

from .transforms import IMAGE_KEYS, Transform, as_transform
from .worker_start import start_worker, worker_start_method

REPORT_EVERY = 1000
PASS_END = "__pass_end__"  # marks the end of one pass over a slot's shards, with how many samples it read


class ErrorCounter:
    """Counts skipped samples and shards in one worker; prints the first and then every Nth."""

    def __init__(self, where: str):
        self.where, self.count = where, 0

    def __call__(self, error: BaseException) -> bool:
        self.count += 1
        if self.count == 1 or self.count % REPORT_EVERY == 0:
            print(f"warning: [{self.where}] skipped a broken sample or shard ({self.count} so far): "
                  f"{type(error).__name__}: {str(error)[:300]}", file=sys.stderr, flush=True)
        return True  # keep going


class ShardStream(IterableDataset):
    def __init__(self, urls: list[str], transform: Union[Transform, Callable[[bytes], torch.Tensor]], *, batch_size: int,
                 training: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 1000, batches_per_epoch: Optional[int] = None,
                 counts: Optional[list[int]] = None, key_range: tuple[float, float] = (0.0, 1.0),
                 repeated_aug: int = 1, require_labels: bool = False, num_classes: int = 0):
        super().__init__()
        if training and not batches_per_epoch:
            raise ValueError("a training stream needs batches_per_epoch")
        self.urls, self.transform, self.batch_size = list(urls), as_transform(transform), batch_size
        self.counts = list(counts) if counts else None
        self.key_range, self.repeated_aug = tuple(key_range), repeated_aug
        self.require_labels, self.num_classes = require_labels, num_classes
        self.training, self.seed, self.rank, self.world_size = training, seed, rank, world_size
        self.shuffle_buffer, self.batches_per_epoch = shuffle_buffer, batches_per_epoch
        self.epoch, self.skip_batches = 0, 0

    # --- which worker am I, and what is my share -------------------------------------------

    def _slot(self) -> tuple[int, int, int, int]:
        """(slot, slots, worker, workers). The DataLoader takes batches from its workers in turn,
        starting with worker 0; a run resumed after `skip_batches` must continue with the worker
        whose turn it was, so worker ids are rotated by that many places."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.training:
            worker = (worker + self.skip_batches) % workers
        return self.rank * workers + worker, self.world_size * workers, worker, workers

    @staticmethod
    def _share(total: int, part: int, parts: int) -> int:
        """Batches `part` gets when `total` batches are dealt round-robin over `parts` (as the
        DataLoader collects from its workers)."""
        return total // parts + (part < total % parts)

    # --- raw samples ------------------------------------------------------------------------

    def _my_shards(self, order: list[int], slot: int, slots: int) -> tuple[list[str], bool]:
        """This slot's shards (in `order`), and whether it owns whole shards (else every slots-th
        sample of all of them). Whole shards are dealt to balance sample counts when they are known;
        when a shard is a large part of a slot's share (few or uneven shards, like the digits set),
        the split is by sample, which is exact whatever the sizes."""
        counts = self.counts
        if len(order) < slots or (counts and max(counts) > 0.1 * sum(counts) / slots):
            return [self.urls[i] for i in order], False
        if not counts:
            return [self.urls[i] for i in order[slot::slots]], True
        load, mine = [0] * slots, []
        for i in order:  # greedy: the next shard goes to the slot with the fewest samples so far
            target = min(range(slots), key=load.__getitem__)
            load[target] += counts[i]
            if target == slot:
                mine.append(self.urls[i])
        return mine, True

    def _raw(self, slot: int, slots: int, errors: ErrorCounter) -> Iterator[dict]:
        """This slot's samples, pass after pass (training) or once (evaluation). The shuffle buffer
        is emptied at the end of each pass, so no sample comes twice before the pass is over."""
        passes = range(sys.maxsize) if self.training else range(1)
        for pass_number in passes:
            order = list(range(len(self.urls)))
            if self.training:  # the same permutation on every rank: then the split is disjoint
                random.Random(make_seed(self.seed, self.epoch, pass_number)).shuffle(order)
            mine, by_shard = self._my_shards(order, slot, slots)
            samples = tarfile_samples(({"url": url} for url in mine), handler=errors)
            mine_only = (s for i, s in enumerate(samples)
                         if (by_shard or i % slots == slot) and in_range(s.get("__key__", ""), *self.key_range))
            count = 0
            for count, sample in enumerate(self._shuffled(mine_only, make_seed(slot, pass_number)), 1):
                yield sample
            yield {PASS_END: count, "__shards__": mine}  # __iter__ checks that the pass gave something

    def _shuffled(self, samples: Iterator[dict], stream_seed: int) -> Iterator[dict]:
        if not self.training or self.shuffle_buffer <= 1:
            yield from samples
            return
        rng = random.Random(make_seed(self.seed, self.epoch, stream_seed))
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    # --- decoded batches --------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        """Batches of decoded samples. With repeated augmentation (k views, training only), each
        group of batch_size samples makes k batches, batch j holding the j-th view of every sample
        of the group: a sample's views are spread over k consecutive batches, never twice in one."""
        slot, slots, worker, workers = self._slot()
        errors = ErrorCounter(f"rank {self.rank} worker {worker}")
        samples = self._raw(slot, slots, errors)
        views = self.repeated_aug if self.training else 1
        quota = self._share(self.batches_per_epoch, worker, workers) if self.training else None
        skipped = self._share(self.skip_batches, worker, workers) if self.training else 0
        groups_skipped, views_to_drop = divmod(skipped, views)
        to_skip, produced, position = groups_skipped * self.batch_size, skipped, 0
        group: list[tuple[list[torch.Tensor], int, str]] = []
        tried = decoded = 0  # in this pass
        for sample in samples:
            if PASS_END in sample:  # a pass that gives nothing would loop forever: stop, naming the shards
                problem = self._empty_pass(sample, tried, decoded, errors)
                if problem:
                    yield {"error": problem}
                    return
                tried = decoded = 0
                continue
            if quota is not None and produced >= quota:
                return
            position += 1
            if position <= to_skip:
                continue  # a resumed run: already trained on; skip without decoding
            tried += 1
            try:
                images, label = self._decode(sample, views, slot, position)
            except Exception as error:
                errors(RuntimeError(f"{sample.get('__key__')} in {sample.get('__url__')}: {error}"))
                continue
            problem = self._label_problem(label, sample)
            if problem:
                yield {"error": problem}
                return
            decoded += 1
            group.append((images, label, sample["__key__"]))
            if len(group) < self.batch_size:
                continue
            for view in range(views_to_drop, views):  # a resumed run may re-enter inside a group
                if quota is not None and produced >= quota:
                    return
                yield self._batch(group, view)
                produced += 1
            group, views_to_drop = [], 0
        if group and not self.training:
            yield self._batch(group, 0)

    @staticmethod
    def _empty_pass(end: dict, tried: int, decoded: int, errors: ErrorCounter) -> Optional[str]:
        shards = end["__shards__"]
        if not shards:
            return None
        if not end[PASS_END]:
            return (f"no readable samples in {len(shards)} shard(s), e.g. {shards[0]} ({errors.count} errors): "
                    "empty, truncated or not tar files; remake them with tools/make_shards.py")
        if tried and not decoded:
            return (f"none of the {tried} samples read from {len(shards)} shard(s), e.g. {shards[0]}, decodes to an "
                    "image (the warnings above say why); remake the shards with tools/make_shards.py, which checks "
                    "every image")
        return None

    def _label_problem(self, label: int, sample: dict) -> Optional[str]:
        if self.require_labels and label < 0:
            return (f"sample {sample.get('__key__')} of {sample.get('__url__')} has no class label (.cls), and this "
                    "run needs labels: make shards from class sub-folders or a CSV of path,label "
                    "(tools/make_shards.py)")
        if self.num_classes and label >= self.num_classes:
            return (f"sample {sample.get('__key__')} of {sample.get('__url__')} has label {label}, but the model has "
                    f"{self.num_classes} classes (model.num_classes): set model.num_classes to the shards' (or "
                    "leave it 0 to read it from their index)")
        return None

    def _decode(self, sample: dict, views: int, slot: int, position: int) -> tuple[list[torch.Tensor], int]:
        """The image decoded once (the transform's `decode`: transforms.Transform) and
        augmented `views` times, each view from its own seed, so a resumed run sees the same crops."""
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise ValueError(f"no image in sample (has {sorted(k for k in sample if not k.startswith('__'))})")
        label = int(sample["cls"]) if "cls" in sample else -1
        source = self.transform.decode(sample[key])
        images = []
        for view in range(views):
            if self.training:
                seed_parts = (self.seed, self.epoch, slot, position) + ((view,) if views > 1 else ())
                sample_seed = make_seed(*seed_parts)
                # the CPU generator only: torch.manual_seed would also queue seeds for every
                # accelerator backend, formatting a stack trace each time (~1 ms per sample)
                torch.default_generator.manual_seed(sample_seed)
                random.seed(sample_seed)
            images.append(self.transform.augment(source))
        return images, label

    @staticmethod
    def _batch(group: list[tuple[list, int, str]], view: int) -> dict:
        """A transform returns an image tensor, a dict of them (several views of one crop, e.g.
        BEiT's model and tokenizer views): each key is stacked into the batch, or a list of views of
        any sizes (multi-crop): stacked view by view into a list (transforms.Transform)."""
        samples = [images[view] for images, _, _ in group]
        first = samples[0]
        if isinstance(first, dict):
            batch = {name: torch.stack([sample[name] for sample in samples]) for name in first}
        elif isinstance(first, (list, tuple)):
            batch = {"images": [torch.stack([sample[i] for sample in samples]) for i in range(len(first))]}
        else:
            batch = {"images": torch.stack(samples)}
        batch.update(labels=torch.tensor([label for _, label, _ in group], dtype=torch.long),
                     keys=[key for _, _, key in group])
        return batch


def in_range(key: str, start: float, stop: float) -> bool:
    """Whether a sample is in a fixed part of its split, chosen by its key: its key's hash u in [0, 1)
    falls in [start, stop). The same samples in every epoch, on every rank and in every process
    count: few-label subsets (data.train_fraction) and the held-out part (data.holdout_fraction)."""
    if start <= 0.0 and stop >= 1.0:
        return True
    position = zlib.crc32(key.encode()) % 100000
    return start * 100000 <= position < stop * 100000


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    """Batches are made in the workers; the DataLoader only moves them (batch_size=None). It gets
    its own generator: drawing worker seeds from the global one at every epoch would shift the
    training RNG (MAE's masks) differently in a resumed run."""
    num_workers = min(num_workers, os.cpu_count() or 1)  # more workers than cores only adds contention
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if num_workers else None, persistent_workers=False,
                      generator=torch.Generator(), worker_init_fn=start_worker if num_workers else None,
                      multiprocessing_context=worker_start_method() if num_workers else None)
