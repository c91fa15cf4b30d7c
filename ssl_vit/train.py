"""The one training loop every task runs in: `accelerate launch pretrain.py recipe=NAME [key=value ...]`.

    config -> plan (derived values: accumulation, lr, steps, saved with the run)
           -> Accelerator (devices, DDP, mixed precision, TensorBoard)
           -> data (webdataset shards, not given to accelerator.prepare)
           -> task (encoder + head + loss), optimizer (groups with lr multipliers)
           -> resume from the newest complete checkpoint, if any
           -> for each optimizer step: accumulate micro-batches, skip non-finite steps, clip,
              lr = schedule(step), update, log, picture, checkpoint, stop on SIGTERM/SIGUSR1
           -> exports: backbone.safetensors (timm keys) and model.safetensors, each with a JSON

The loop knows nothing about MAE or DeiT: it calls the task contract (ssl_vit/tasks/base.py).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from . import config
from .config import ConfigError
from .run_state import Checkpoints, Preemption, TrainState

PICTURE_IMAGES = 8  # images TensorBoard shows, the same ones every time


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

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.per_device_batch} per device x {self.world_size} "
                f"process(es) x {self.accumulation} accumulation step(s); lr {self.base_lr:.4g}; "
                f"{self.steps_per_epoch} steps per epoch of {self.samples_per_epoch} samples; "
                f"{self.total_steps} steps in all ({self.warmup_steps} warm-up), stopping at {self.stop_step}")


def make_plan(cfg, world_size: int, samples_per_epoch: int, num_classes: int = 0) -> Plan:
    from .optim import base_lr

    per_device, global_batch = cfg.data.batch_size, cfg.optim.batch_size
    if global_batch % (per_device * world_size):
        raise ConfigError(
            f"optim.batch_size={global_batch} (global) is not a multiple of data.batch_size={per_device} (per "
            f"device) x {world_size} process(es); choose data.batch_size to divide {global_batch // world_size}")
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
                base_lr=base_lr(cfg.optim), min_lr=cfg.optim.min_lr, num_classes=num_classes)


class Trainer:
    def __init__(self, cfg):
        import torch
        from accelerate import Accelerator, PartialState
        from accelerate.utils import ProjectConfiguration, set_seed

        from .data import DeviceNormalize, build_train_loader, num_classes, samples_per_epoch, shard_source
        from .evaluate import Evaluator
        from .optim import Schedule, build_optimizer
        from .tasks import RunContext, task_class

        self.cfg = cfg
        self.output_dir = Path(cfg.train.output_dir)
        # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: Accelerate only
        # forms a process group on CPU when asked to; otherwise each process would train alone
        cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        state = PartialState(cpu=cpu)
        source = shard_source(cfg, "train")
        kind = task_class(cfg.task.name)
        self.plan = make_plan(cfg, state.num_processes, samples_per_epoch(cfg, source),
                              num_classes(cfg, source) if kind.uses_labels(cfg) else 0)
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=mixed_precision(cfg.train.precision), gradient_accumulation_steps=self.plan.accumulation,
            log_with="tensorboard" if cfg.log.tensorboard else None, step_scheduler_with_optimizer=False,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "tensorboard")))
        accelerator = self.accelerator
        set_seed(cfg.train.seed, device_specific=True)  # MAE masks differ per rank; DDP syncs the init

        self.task = kind.build(cfg, self.plan.num_classes)
        self.encoder = self.task.encoder
        self._print(self.task.describe())
        if cfg.init and cfg.init != "random":
            from .checkpoint import load_weights

            load_weights(self.task, cfg.init, verbose=accelerator.is_main_process)
        if cfg.train.grad_checkpointing:
            self.encoder.set_grad_checkpointing(True)
        self.task.to(accelerator.device)
        self.normalize = DeviceNormalize(cfg.data.mean, cfg.data.std, cfg.data.random_erasing,
                                         accelerator.device).to(accelerator.device)
        run = RunContext(cfg=cfg, accelerator=accelerator, plan=self.plan, normalize=self.normalize, source=source,
                         print=self._print)
        self.data = self.task.training_data(run)  # data of the task's own making (cached features), or shards
        if self.data is None:
            self.data = build_train_loader(cfg, batches_per_epoch=self.plan.steps_per_epoch * self.plan.accumulation,
                                           rank=accelerator.process_index, world_size=accelerator.num_processes,
                                           source=source)
        self.optimizer = build_optimizer(cfg.optim, self.task)
        model = torch.compile(self.task) if cfg.train.compile else self.task
        self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        self.schedule = Schedule(self.plan.base_lr, self.plan.min_lr, self.plan.warmup_steps, self.plan.total_steps)
        self.ema = None
        if cfg.train.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.task, decay=cfg.train.ema_decay)
        evaluates = "val" in kind.required_splits(cfg)
        self.evaluator = Evaluator(cfg, self.task, accelerator, self.normalize, self.plan.num_classes) if evaluates else None
        self.state = TrainState(world_size=accelerator.num_processes)
        self.checkpoints = Checkpoints(accelerator, self.output_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
        self.preemption = Preemption(self.output_dir / "STOP", watch_file=accelerator.is_main_process)
        self.preemption.clear()  # a stale request from a run that died before honouring it
        self.log_file = self.output_dir / "log.jsonl"
        self.pictures_batch = None

    # ---------------------------------------------------------------------------------------

    def run(self) -> int:
        accelerator, plan = self.accelerator, self.plan
        resumed = self._resume()
        if self.state.step >= plan.stop_step:
            # a finished run is left as it is (its exports, metrics and logs); only missing exports are written
            self._print(f"nothing to do: the run in {self.output_dir} is at step {self.state.step} of {plan.stop_step}")
            if not (self.output_dir / "model.safetensors").is_file():
                self._export()
            return 0
        self._write_run_files(resumed)
        progress = self._progress_bar()
        window = _Window()
        epoch = self.state.step // plan.steps_per_epoch
        skip = (self.state.step % plan.steps_per_epoch) * plan.accumulation
        exit_code = None
        while exit_code is None and self.state.step < plan.stop_step:
            batches = self.data.epoch(epoch, skip_batches=skip)
            skip = 0
            for micro_batches in _chunks(batches, plan.accumulation):
                stats = self.train_step(micro_batches)
                window.add(stats, plan.global_batch)
                progress.update(1)
                if self.state.step % self.cfg.log.every == 0 or self.state.step == plan.stop_step:
                    self._log(window, epoch, progress)
                    window = _Window()
                if self.state.step % self.cfg.log.images_every == 0:
                    self._log_pictures(micro_batches[0])
                self._evaluate_when_due()
                exit_code = self._after_step()
                if exit_code is not None or self.state.step >= plan.stop_step:
                    break
            epoch += 1
        progress.close()
        if exit_code is not None:
            return exit_code
        final = self._evaluate() if self.evaluator is not None else None
        self._save_checkpoint()
        self._export()
        self._write_metrics(final)
        accelerator.end_training()
        self._print(f"done: {self.state.step} steps, {self.state.samples_seen} samples; outputs in {self.output_dir}")
        return 0

    # --- evaluation -------------------------------------------------------------------------

    def _evaluate_when_due(self) -> None:
        """Classification: every eval.every_epochs epochs (at the epoch's last step, not the run's
        last, which is evaluated anyway). Other tasks: the k-NN monitor every eval.knn_every steps."""
        if self.evaluator is None or self.state.step >= self.plan.stop_step:
            return
        every_epochs, knn_every = self.cfg.eval.every_epochs, self.cfg.eval.knn_every
        if self.task.evaluation == "top-k":
            epochs_done, into_epoch = divmod(self.state.step, self.plan.steps_per_epoch)
            if every_epochs and into_epoch == 0 and epochs_done % every_epochs == 0:
                self._evaluate()
        elif knn_every and self.state.step % knn_every == 0:
            self._evaluate()

    def _evaluate(self) -> dict:
        metrics = self.evaluator(ema_module=self.ema.module if self.ema is not None else None)
        scalars = {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=self.state.samples_seen)
        if self.accelerator.is_main_process:
            with self.log_file.open("a") as f:
                f.write(json.dumps({"step": self.state.step, "samples": self.state.samples_seen, "eval": metrics}) + "\n")
        shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.endswith(("top1", "top5")))
        self._print(f"step {self.state.step}: {shown} on {metrics.get('num_samples', metrics.get('knn_num_samples'))} "
                    "validation samples")
        if self.task.evaluation == "top-k" and metrics["top1"] > self.state.best.get("top1", -1.0):
            self.state.best = {**{k: v for k, v in metrics.items() if k != "heads"}, "step": self.state.step,
                               "epoch": self.state.step / self.plan.steps_per_epoch}
            self._export(best=True)
        return metrics

    def _write_metrics(self, final: Optional[dict]) -> None:
        if final is None or not self.accelerator.is_main_process:
            return
        from .outputs import write_metrics

        print(write_metrics(self.output_dir, self.cfg, self.task.evaluation, self.state.step, final, self.state.best))

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over `accumulation` micro-batches (or fewer at a data shortfall)."""
        loss_sum, nonfinite, metrics = self.accumulate_gradients(micro_batches)
        return self.apply_update(loss_sum / max(1, len(micro_batches)), nonfinite, metrics,
                                 samples=sum(len(micro["labels"]) for micro in micro_batches))

    def accumulate_gradients(self, micro_batches: list[dict]):
        """Forward and backward of each micro-batch; DDP all-reduces on the last one. A non-finite
        loss on any rank skips that micro-batch's backward on every rank (skipping it on one rank
        only would leave the others waiting in the all-reduce) and marks the step as skipped."""
        import torch

        accelerator = self.accelerator
        loss_sum, nonfinite, metrics = 0.0, False, {}
        for micro in micro_batches:
            batch = self._to_device(micro)
            with accelerator.accumulate(self.model):
                output = self.model(batch)
                loss = output.loss
                bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=accelerator.device)
                if accelerator.num_processes > 1:
                    bad = accelerator.reduce(bad, reduction="sum")
                if bad.item() > 0:
                    nonfinite = True
                    continue
                accelerator.backward(loss)
            loss_sum += loss.detach().float().item()
            for name, value in output.metrics.items():
                metrics[name] = metrics.get(name, 0.0) + float(value) / len(micro_batches)
        return loss_sum, nonfinite, metrics

    def apply_update(self, loss: float, nonfinite: bool, metrics: dict, samples: int) -> dict:
        from .optim import set_lr

        accelerator, cfg = self.accelerator, self.cfg
        max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad else float("inf")
        grad_norm = float("nan")
        if not nonfinite:
            grad_norm = float(accelerator.clip_grad_norm_(self.task.parameters(), max_norm))
            nonfinite = not math.isfinite(grad_norm)  # the norm of all-reduced grads: equal on all ranks
        lr = self.schedule(self.state.step)
        if nonfinite:
            self.state.nonfinite_total += 1
            self.state.nonfinite_streak += 1
        else:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.task, step=self.state.step)
            self.state.nonfinite_streak = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.samples_seen += samples * accelerator.num_processes
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": int(nonfinite), **metrics}

    # ---------------------------------------------------------------------------------------

    def _to_device(self, micro: dict) -> dict:
        device = self.accelerator.device
        batch = {key: value.to(device, non_blocking=True) for key, value in micro.items()
                 if hasattr(value, "to")}  # images or cached features, labels (and e.g. fixed MAE noise)
        if "images" in batch:
            batch["images"] = self.normalize(batch["images"], training=True)
        return batch

    def _after_step(self) -> Optional[int]:
        """Checkpoints, preemption and the non-finite guard, decided the same way on every rank."""
        import torch

        accelerator, cfg = self.accelerator, self.cfg
        signals = torch.tensor([float(self.preemption.asked())], device=accelerator.device)
        if accelerator.num_processes > 1:
            signals = accelerator.reduce(signals, reduction="sum")
        if signals.item() > 0:
            self._save_checkpoint()
            self.preemption.clear()
            self._print(f"preempted: checkpoint written at step {self.state.step}; re-run the same command to resume")
            return 0
        if self.state.nonfinite_streak >= cfg.train.max_nonfinite_steps:
            self._save_checkpoint()
            self._print(f"stopping: {self.state.nonfinite_streak} optimizer steps in a row had a non-finite loss or "
                        f"gradient ({self.state.nonfinite_total} in all); checkpoint at step {self.state.step}. Lower "
                        "optim.blr, set optim.clip_grad, or use train.precision=bf16 instead of fp16", error=True)
            return 1
        if self.state.step % cfg.train.checkpoint_every == 0 and self.state.step < self.plan.stop_step:
            self._save_checkpoint()
        return None

    # --- checkpoints ------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        self.checkpoints.save(self.state, ema=self.ema)

    def _resume(self) -> bool:
        path = self.checkpoints.find(str(self.cfg.resume))
        if path is not None:
            self.state, note = self.checkpoints.load(path, ema=self.ema)
            self._print(f"resumed from {path} at step {self.state.step}{note}")
        return path is not None

    def _write_run_files(self, resumed: bool) -> None:
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        header = "".join(f"# {line}\n" for line in (
            f"resolved recipe {self.cfg.recipe!r}, written by pretrain.py; reusable as recipe=<this file>",
            "derived: " + self.plan.describe()))
        (self.output_dir / "config.yaml").write_text(header + config.to_yaml(self.cfg))
        (self.output_dir / "plan.json").write_text(json.dumps(asdict(self.plan), indent=1) + "\n")
        self.accelerator.init_trackers("", config={"plan/" + k: v for k, v in asdict(self.plan).items()})
        self._print(("resuming: " if resumed else "starting: ") + self.plan.describe())

    # --- logging ----------------------------------------------------------------------------

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(total=self.plan.stop_step, initial=self.state.step, desc=self.cfg.recipe, unit="step",
                    dynamic_ncols=True, disable=not self.accelerator.is_main_process)

    def _log(self, window: "_Window", epoch: int, progress) -> None:
        values = window.summary()
        values.update(step=self.state.step, samples=self.state.samples_seen, epoch=epoch,
                      nonfinite_total=self.state.nonfinite_total)
        progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{values['img_s']:.0f}")
        if self.accelerator.is_main_process:
            with self.log_file.open("a") as f:
                f.write(json.dumps(values) + "\n")
        # curves against images seen compare runs of any batch size or process count
        self.accelerator.log({f"train/{k}": v for k, v in values.items() if k != "samples"},
                             step=self.state.samples_seen)

    def _log_pictures(self, micro: dict) -> None:
        """The same few images every time, to watch them improve: what the task draws of them (an
        MAE's reconstructions of its first training images, a classifier's attention maps of the
        first validation images)."""
        if not self.accelerator.is_main_process or not self.cfg.log.tensorboard:
            return
        if self.pictures_batch is None:
            split = self.task.picture_split()
            if split is None:  # nothing to watch (a frozen encoder, an encoder without maps)
                return
            if split == "train":
                self.pictures_batch = micro["images"][:PICTURE_IMAGES].clone()
            else:
                from .data import build_eval_loader

                batch = next(iter(build_eval_loader(self.cfg, split, batch_size=PICTURE_IMAGES)))
                self.pictures_batch = batch["images"][:PICTURE_IMAGES].clone()
        images = self.normalize(self.pictures_batch.to(self.accelerator.device))
        was_training = self.task.training
        self.task.eval()
        with self.accelerator.autocast():
            pictures = self.task.pictures(images, self.normalize.denormalize)
        self.task.train(was_training)
        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        for tag, grid in pictures.items():
            tracker.add_image(tag, grid, global_step=self.state.samples_seen)

    def _print(self, message: str, error: bool = False) -> None:
        if self.accelerator.is_main_process:
            print(message, file=sys.stderr if error else sys.stdout, flush=True)

    # --- outputs ----------------------------------------------------------------------------

    def _export(self, best: bool = False) -> None:
        """backbone.safetensors and model.safetensors (each with its JSON), or model_best.safetensors."""
        from .outputs import export_run

        if self.accelerator.is_main_process:
            export_run(self.task, self.output_dir, self.cfg, self.state.step, self.state.samples_seen,
                       best=self.state.best if best else None)


class _Window:
    """Running means between two log lines, and the throughput over that time."""

    def __init__(self):
        self.start, self.steps, self.samples, self.sums = time.perf_counter(), 0, 0, {}

    def add(self, stats: dict, samples: int) -> None:
        self.steps += 1
        self.samples += samples
        for key, value in stats.items():
            if key == "lr":
                self.sums[key] = value  # the latest
            elif isinstance(value, (int, float)) and math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + value

    def summary(self) -> dict:
        elapsed = time.perf_counter() - self.start
        values = {k: (v if k in ("lr", "skipped") else v / max(1, self.steps)) for k, v in self.sums.items()}
        values.setdefault("loss", float("nan"))
        values["img_s"] = self.samples / elapsed if elapsed > 0 else 0.0
        return values


def _chunks(batches, size: int):
    """Group the loader's batches into the micro-batches of one optimizer step."""
    chunk = []
    for batch in batches:
        chunk.append(batch)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def mixed_precision(name: str) -> str:
    """auto: bf16 autocast where the GPU supports it, full fp32 on CPU (bf16 also runs on CPU when asked)."""
    if name != "auto":
        return name
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
