"""Building a run's parts from its recipe, before any step: the folder's lock, the plan, Accelerate,
the task (and its initial weights), its sharding, its data, the optimizer and schedule, the EMA, its
evaluation protocol, checkpoints and the stop requests. run/loop.py runs them.

    cfg -> lock the output folder -> plan (world size, samples per epoch, classes)
        -> Accelerator (devices, DDP, precision, TensorBoard) -> task (+ init weights, checkpointing)
        -> DDP or FSDP2 -> data (the task's own, or shards) -> optimizer, schedule, EMA
        -> evaluation protocol -> checkpoints, stop requests, step-start records
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from timm.utils import ModelEmaV3

from ..config import ConfigError
from ..data.loaders import build_train_loader, image_size, num_classes, samples_per_epoch, shard_source
from ..data.transforms import DeviceNormalize
from ..eval import Protocol, protocol_for
from ..tasks import RunContext, Task, task_class
from ..weights import load_weights
from .checkpoints import Checkpoints
from .folder import FolderLock
from .optim import Schedule, build_optimizer, weight_decay_schedule
from .outputs import file_sha256
from .plan import Plan, make_plan, mixed_precision
from .sharding import strategy
from .state import StepStart, TrainState
from .stops import Preemption


@dataclass
class RunParts:
    cfg: Any
    output_dir: Path
    lock: FolderLock
    plan: Plan
    accelerator: Accelerator
    parallel: Any                   # DDP (Accelerate) or FSDP2: the same verbs for the loop (sharding.py)
    task: Task                      # the module itself
    model: Any                      # what is called: the task, maybe compiled, wrapped by DDP
    optimizer: Any
    schedule: Schedule
    weight_decay: Optional[Callable[[int], float]]  # the weight decay of a step, when scheduled (optim.weight_decay_end)
    ema: Optional[ModelEmaV3]
    normalize: DeviceNormalize
    data: Any                       # .epoch(e, skip_batches) -> batches
    protocol: Optional[Protocol]    # None: the run does not evaluate
    classes: list                   # the training index's class names, for exports
    state: TrainState
    checkpoints: Checkpoints
    preemption: Preemption
    step_start: StepStart

    def print(self, message: str, error: bool = False) -> None:
        """Progress and messages from the main process only; every other rank stays quiet."""
        if self.accelerator.is_main_process:
            print(message, file=sys.stderr if error else sys.stdout, flush=True)


def build_parts(cfg) -> RunParts:
    output_dir = Path(cfg.train.output_dir)
    # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: Accelerate only forms a
    # process group on CPU when asked to; otherwise each process would train alone
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    process = PartialState(cpu=cpu)
    lock = hold_the_folder(output_dir, process)
    source = shard_source(cfg, "train")
    kind = task_class(cfg.task.name)
    protocol_class = protocol_for(kind)
    labels = kind.needs_labels or protocol_class.needs_labels(cfg)
    plan = make_plan(cfg, process.num_processes, samples_per_epoch(cfg, source), num_classes(cfg, source) if labels else 0)
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed_precision(cfg.train.precision), gradient_accumulation_steps=plan.accumulation,
        log_with="tensorboard" if cfg.log.tensorboard else None, step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")))
    set_seed(cfg.train.seed, device_specific=True)  # MAE masks differ per rank; DDP syncs the initialisation
    parallel = strategy(cfg, accelerator)

    task = kind.build(cfg, plan.num_classes)
    say = (lambda message: print(message, flush=True)) if accelerator.is_main_process else (lambda message: None)
    say(task.describe())
    if cfg.init and cfg.init != "random":
        # a file that leaves most of the encoder as initialised is a mistake unless asked for
        load_weights(task, cfg.init, verbose=accelerator.is_main_process,
                     min_encoder_fraction=0.0 if cfg.init_partial else 0.5)
    if cfg.train.grad_checkpointing:
        task.encoder.set_grad_checkpointing(True)
    task.to(accelerator.device)
    if parallel.sharded:
        units = parallel.shard(task)
        say(f"fsdp: {len(units)} blocks and the rest sharded over {accelerator.num_processes} process(es)")
    normalize = DeviceNormalize(cfg.data.mean, cfg.data.std, cfg.data.random_erasing,
                                accelerator.device).to(accelerator.device)
    context = RunContext(cfg=cfg, accelerator=accelerator, plan=plan, normalize=normalize, source=source, print=say)
    data = task.training_data(context)  # data of the task's own making (cached features), or the shards
    if data is None:
        data = build_train_loader(cfg, batches_per_epoch=plan.steps_per_epoch * plan.accumulation,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes, source=source,
                                  labels=kind.needs_labels, num_classes=plan.num_classes,
                                  transform=kind.train_transform(cfg, image_size(cfg)))
    optimizer = build_optimizer(cfg.optim, task)
    model, optimizer = parallel.prepare(torch.compile(task) if cfg.train.compile else task, optimizer)
    schedule = Schedule(plan.base_lr, plan.min_lr, plan.warmup_steps, plan.total_steps, milestones=plan.milestones,
                        gamma=cfg.optim.lr_gamma)
    weight_decay = weight_decay_schedule(cfg.optim, plan.total_steps)
    ema = ModelEmaV3(task, decay=cfg.train.ema_decay) if cfg.train.ema_decay else None

    launched = any(k in os.environ for k in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION"))
    preemption = Preemption(output_dir / "STOP", watch_file=accelerator.is_main_process, launched=launched,
                            group=stop_group(accelerator))
    preemption.clear()  # a stale request from a run that died before honouring it
    protocol = (protocol_class(cfg, task, accelerator, normalize, plan.num_classes, rounds=preemption.rounds)
                if protocol_class.runs(cfg) else None)
    checkpoints = Checkpoints(accelerator, output_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                              save_state=lambda folder: parallel.save(folder, model, optimizer),
                              load_state=lambda folder: parallel.load(folder, model, optimizer))
    if accelerator.is_main_process:
        for name in checkpoints.remove_unfinished():
            say(f"removed {name}: a checkpoint a crash or a full disk left unfinished")
    state = TrainState(world_size=accelerator.num_processes,
                       init_sha256=file_sha256(cfg.init) if cfg.init and cfg.init != "random" else None)
    return RunParts(cfg=cfg, output_dir=output_dir, lock=lock, plan=plan, accelerator=accelerator, parallel=parallel,
                    task=task, model=model, optimizer=optimizer, schedule=schedule, weight_decay=weight_decay, ema=ema, normalize=normalize,
                    data=data, protocol=protocol, classes=list(source.classes) if kind.needs_labels else [],
                    state=state, checkpoints=checkpoints, preemption=preemption,
                    step_start=StepStart(task, accelerator))


def hold_the_folder(output_dir: Path, process: PartialState) -> FolderLock:
    """Rank 0 takes the output folder's lock for the whole run; every rank learns whether it could
    (a second run writing into the same folder would interleave logs and checkpoints)."""
    lock = FolderLock(output_dir)
    holder = lock.acquire() if process.is_main_process else None
    if process.num_processes > 1:
        holder = broadcast_object_list([holder])[0]
    if holder is not None:
        raise ConfigError(f"another run is writing into {output_dir} ({holder}): wait for it to finish (a preempted "
                          "run is writing its checkpoint), stop it, or give another train.output_dir")
    return lock


def stop_group(accelerator):
    """A gloo process group on which the ranks agree on stop requests: a CPU tensor, so the agreement
    never waits for the device (NCCL would). None with one process."""
    if accelerator.num_processes <= 1:
        return None
    return dist.new_group(backend="gloo")


def close_processes(accelerator) -> None:
    """End the process group once every rank is done: a rank that exits while the others still talk
    (or with its group alive) can abort in gloo's threads ("terminate called without an active
    exception"), failing a run that succeeded."""
    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()
