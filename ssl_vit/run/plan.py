"""What a run derives from its recipe and the processes the launcher started, computed once, logged
and saved with the run (plan.json): the per-device batch and the accumulation that make the global
batch, the steps per epoch, the schedule's length and warm-up, the lr; and the precision."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from .flops import native_bf16
from .optim import base_lr


@dataclass(frozen=True)
class Plan:
    """Everything derived from the recipe and the number of processes, computed once."""
    world_size: int
    per_device_batch: int
    accumulation: int
    global_batch: int
    samples_per_epoch: int
    steps_per_epoch: int
    total_steps: int           # the schedule's length (optim.epochs)
    warmup_steps: int
    stop_step: int             # where this run stops (train.max_steps, or total_steps)
    base_lr: float
    min_lr: float
    num_classes: int = 0       # classification tasks: from model.num_classes or the training index
    milestones: tuple = ()     # the step schedule's drops (optim.lr_milestones, in steps)

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.per_device_batch} per device x {self.world_size} "
                f"process(es) x {self.accumulation} accumulation step(s); lr {self.base_lr:.4g}; "
                f"{self.steps_per_epoch} steps per epoch of {self.samples_per_epoch} samples; "
                f"{self.total_steps} steps in all ({self.warmup_steps} warm-up), stopping at {self.stop_step}")


def make_plan(cfg, world_size: int, samples_per_epoch: int, num_classes: int = 0) -> Plan:
    per_device, global_batch = cfg.data.batch_size, cfg.optim.batch_size
    check_batch(cfg, world_size)
    steps_per_epoch = samples_per_epoch // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch of {samples_per_epoch} samples holds no step of optim.batch_size={global_batch}; "
                          "lower optim.batch_size or raise data.samples_per_epoch")
    total = max(1, round(cfg.optim.epochs * steps_per_epoch))
    stop = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    return Plan(world_size=world_size, per_device_batch=per_device,
                accumulation=global_batch // (per_device * world_size), global_batch=global_batch,
                samples_per_epoch=samples_per_epoch, steps_per_epoch=steps_per_epoch, total_steps=total,
                warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch), stop_step=stop,
                base_lr=base_lr(cfg.optim), min_lr=cfg.optim.min_lr, num_classes=num_classes,
                milestones=tuple(round(epoch * steps_per_epoch) for epoch in cfg.optim.lr_milestones)
                if cfg.optim.schedule == "step" else ())


def check_batch(cfg, world_size: int) -> None:
    """The global batch must split into equal per-device batches and accumulation steps; the error
    gives a data.batch_size that works."""
    per_device, global_batch = cfg.data.batch_size, cfg.optim.batch_size
    if global_batch % (per_device * world_size) == 0:
        return
    share = global_batch // world_size
    fits = max((d for d in range(1, min(per_device, share) + 1) if share % d == 0), default=None) \
        if global_batch % world_size == 0 else None
    fix = (f"add data.batch_size={fits} (a divisor of {share}, the global batch's share of each process)" if fits
           else f"optim.batch_size is not divisible by {world_size} processes: change optim.batch_size or the "
                "number of processes")
    raise ConfigError(f"optim.batch_size={global_batch} (global) is not a multiple of data.batch_size={per_device} "
                      f"(per device) x {world_size} process(es): {fix}")


def mixed_precision(name: str) -> str:
    """auto: bf16 autocast where the device computes in bf16 natively (a GPU that supports it, a CPU with
    AVX512-BF16 or AMX, as torch reports them), fp32 elsewhere (on an AVX2-only CPU bf16 is emulated,
    many times slower than fp32)."""
    if name != "auto":
        return name
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if native_bf16(device) else "no"
