"""Recipe-level builders of the training and evaluation loaders."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from torch.utils.data import DataLoader

from ..config import MAKE_SHARDS_HINT, ConfigError
from .digits import digits_index
from .sources import ShardSource, read_index, resolve
from .stream import ShardStream, make_loader
from .transforms import build_transform
from .worker_start import end_workers


def shard_source(cfg, split: str) -> ShardSource:
    """The shards of `split` ("train" or "val") named by the recipe (or the embedded digits)."""
    if cfg.data.name == "digits":
        return read_index(digits_index(split), f"digits {split}")
    spec = cfg.data[split]
    if not spec:
        raise ConfigError(f"data.{split} is required by recipe {cfg.recipe!r} (data.name=shards): {MAKE_SHARDS_HINT} "
                          "-- or try the embedded digits data with data.name=digits")
    return resolve(spec if isinstance(spec, str) else list(spec), f"data.{split}")


def training_range(cfg) -> tuple[float, float]:
    """The part of the training split that trains (by key hash): data.train_fraction of what the
    held-out part (data.holdout_fraction, at the top of the range) leaves."""
    return 0.0, (1.0 - cfg.data.holdout_fraction) * cfg.data.train_fraction


def holdout_range(cfg) -> tuple[float, float]:
    return 1.0 - cfg.data.holdout_fraction, 1.0


def samples_per_epoch(cfg, source: ShardSource) -> int:
    """data.samples_per_epoch, or the index's count of the samples that train (data.train_fraction
    of what data.holdout_fraction leaves)."""
    if cfg.data.samples_per_epoch:
        return int(cfg.data.samples_per_epoch)
    if source.num_samples is None:
        raise ConfigError(f"cannot tell how many samples data.train={source.spec!r} holds: point it at the "
                          "index written by make_shards.py (e.g. data.train=shards/NAME.json), or set "
                          "data.samples_per_epoch")
    start, stop = training_range(cfg)
    return max(1, round(source.num_samples * (stop - start)))


def num_classes(cfg, source: ShardSource) -> int:
    """model.num_classes, or the number of classes in the training index."""
    if cfg.model.num_classes:
        return int(cfg.model.num_classes)
    if not source.classes:
        raise ConfigError(f"cannot tell how many classes data.train={source.spec!r} has (no make_shards index): "
                          "set model.num_classes")
    return len(source.classes)


def image_size(cfg) -> list[int]:
    size = cfg.model.img_size
    return [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]


@dataclass
class TrainData:
    stream: ShardStream
    loader: DataLoader
    source: ShardSource
    batches_per_epoch: int

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """The batches of one epoch on this rank; `skip_batches` resumes inside an epoch."""
        self.stream.epoch, self.stream.skip_batches = epoch, skip_batches
        return checked(self.loader)


@dataclass
class EvalData:
    stream: ShardStream
    loader: DataLoader
    source: ShardSource

    @property
    def num_samples(self) -> Optional[int]:
        return self.source.num_samples

    def __iter__(self) -> Iterator[dict]:
        return checked(self.loader)


def checked(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches; a worker's {"error": message} (a stream that cannot go on) becomes one
    line on the trainer's side. However the iteration ends (its end, an error, a stop, `close()`), the
    workers are ended with it (worker_start.end_workers says why that cannot be left to torch)."""
    iterator = iter(loader)
    try:
        for batch in iterator:
            if "error" in batch:
                raise ConfigError(batch["error"])
            yield batch
    finally:
        end_workers(iterator)


def build_train_loader(cfg, *, batches_per_epoch: int, rank: int = 0, world_size: int = 1,
                       source: Optional[ShardSource] = None, labels: bool = False, num_classes: int = 0,
                       transform=None) -> TrainData:
    """`labels`: the run trains on labels (every sample must carry one, below `num_classes`);
    `transform`: a task's own training transform (default: data.train_transform's)."""
    source = source or shard_source(cfg, "train")
    stream = ShardStream(source.urls, transform or build_transform(cfg.data, image_size(cfg), training=True),
                         batch_size=cfg.data.batch_size, training=True, seed=cfg.train.seed, rank=rank,
                         world_size=world_size, shuffle_buffer=cfg.data.shuffle_buffer,
                         batches_per_epoch=batches_per_epoch, counts=source.counts,
                         key_range=training_range(cfg), repeated_aug=cfg.data.repeated_aug,
                         require_labels=labels, num_classes=num_classes if labels else 0)
    return TrainData(stream, make_loader(stream, cfg.data.num_workers), source, batches_per_epoch)


def build_eval_loader(cfg, split: str = "val", *, rank: int = 0, world_size: int = 1,
                      batch_size: Optional[int] = None, training_transform: bool = False) -> EvalData:
    """Every sample of `split` once over all ranks: "val", "train" (all of it), or "holdout" (the
    part of the training split that data.holdout_fraction keeps out of training, for selection)."""
    source = shard_source(cfg, "train" if split == "holdout" else split)
    transform = build_transform(cfg.data, image_size(cfg), training=training_transform)
    stream = ShardStream(source.urls, transform, batch_size=batch_size or cfg.data.batch_size, training=False,
                         seed=cfg.train.seed, rank=rank, world_size=world_size, counts=source.counts,
                         key_range=holdout_range(cfg) if split == "holdout" else (0.0, 1.0),
                         require_labels=True)  # evaluations (top-k, k-NN, cached features) read labels
    return EvalData(stream, make_loader(stream, cfg.data.num_workers), source)
