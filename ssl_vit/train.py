"""The one training loop every task runs in: `accelerate launch pretrain.py recipe=NAME [key=value ...]`.

    config -> plan (derived values: accumulation, lr, steps, saved with the run)
           -> Accelerator (devices, DDP, mixed precision, TensorBoard)
           -> data (webdataset shards, not given to accelerator.prepare)
           -> task (encoder + head + loss), optimizer (groups with lr multipliers)
           -> resume from the newest complete checkpoint, if any
           -> for each optimizer step: accumulate micro-batches, skip non-finite steps, clip,
              lr = schedule(step), update, log, picture, checkpoint
           -> the last checkpoint, the final evaluation, exports: backbone.safetensors (timm keys) and
              model.safetensors, each with a JSON, and metrics.json (last)

A stop request (SIGTERM, SIGUSR1, SIGINT, a STOP file; run_state.Preemption) is taken before every
step and micro-batch, and with one process at once inside a step: the step in progress is abandoned
(its RNG draws and buffer updates undone) and the last complete step is checkpointed, within the
launchers' grace windows (docs/faults.md).

The loop knows nothing about MAE or DeiT: it calls the task contract (ssl_vit/tasks/base.py).
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from . import config
from .config import ConfigError
from .run_folder import FolderLock, run_files
from .run_state import Checkpoints, Preemption, StepStart, StopRequested, TrainState, starts_over

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
    milestones: tuple = ()     # the step schedule's drops (optim.lr_milestones, in steps)

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.per_device_batch} per device x {self.world_size} "
                f"process(es) x {self.accumulation} accumulation step(s); lr {self.base_lr:.4g}; "
                f"{self.steps_per_epoch} steps per epoch of {self.samples_per_epoch} samples; "
                f"{self.total_steps} steps in all ({self.warmup_steps} warm-up), stopping at {self.stop_step}")


def make_plan(cfg, world_size: int, samples_per_epoch: int, num_classes: int = 0) -> Plan:
    from .optim import base_lr

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
        self.lock = FolderLock(self.output_dir)
        self._hold_the_folder(state)
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
        from .sharding import strategy

        self.parallel = strategy(cfg, accelerator)  # DDP (Accelerate) or FSDP2: the same verbs for the loop

        self.classes = list(source.classes) if kind.needs_labels else []  # the index's names, for exports
        self.task = kind.build(cfg, self.plan.num_classes)
        self.encoder = self.task.encoder
        self._print(self.task.describe())
        if cfg.init and cfg.init != "random":
            from .checkpoint import load_weights

            # a file that leaves most of the encoder as initialised is a mistake unless asked for
            load_weights(self.task, cfg.init, verbose=accelerator.is_main_process,
                         min_encoder_fraction=0.0 if cfg.init_partial else 0.5)
        if cfg.train.grad_checkpointing:
            self.encoder.set_grad_checkpointing(True)
        self.task.to(accelerator.device)
        if self.parallel.sharded:
            units = self.parallel.shard(self.task)
            self._print(f"fsdp: {len(units)} blocks and the rest sharded over {accelerator.num_processes} process(es)")
        self.normalize = DeviceNormalize(cfg.data.mean, cfg.data.std, cfg.data.random_erasing,
                                         accelerator.device).to(accelerator.device)
        run = RunContext(cfg=cfg, accelerator=accelerator, plan=self.plan, normalize=self.normalize, source=source,
                         print=self._print)
        self.data = self.task.training_data(run)  # data of the task's own making (cached features), or shards
        if self.data is None:
            from .data.loaders import image_size

            self.data = build_train_loader(cfg, batches_per_epoch=self.plan.steps_per_epoch * self.plan.accumulation,
                                           rank=accelerator.process_index, world_size=accelerator.num_processes,
                                           source=source, labels=kind.needs_labels, num_classes=self.plan.num_classes,
                                           transform=kind.train_transform(cfg, image_size(cfg)))
        self.optimizer = build_optimizer(cfg.optim, self.task)
        model = torch.compile(self.task) if cfg.train.compile else self.task
        self.model, self.optimizer = self.parallel.prepare(model, self.optimizer)
        self.schedule = Schedule(self.plan.base_lr, self.plan.min_lr, self.plan.warmup_steps, self.plan.total_steps,
                                 milestones=self.plan.milestones, gamma=cfg.optim.lr_gamma)
        self.ema = None
        if cfg.train.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.task, decay=cfg.train.ema_decay)
        evaluates = "val" in kind.required_splits(cfg)
        launched = any(k in os.environ for k in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION"))
        self.preemption = Preemption(self.output_dir / "STOP", watch_file=accelerator.is_main_process,
                                     launched=launched, group=_stop_group(accelerator))
        self.preemption.clear()  # a stale request from a run that died before honouring it
        self.step_start = StepStart(self.task, accelerator)
        self.evaluator = Evaluator(cfg, self.task, accelerator, self.normalize, self.plan.num_classes,
                                   rounds=self.preemption.rounds) if evaluates else None
        from .outputs import file_sha256

        self.state = TrainState(world_size=accelerator.num_processes,
                                init_sha256=file_sha256(cfg.init) if cfg.init and cfg.init != "random" else None)
        self.checkpoints = Checkpoints(accelerator, self.output_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                                       save_state=lambda folder: self.parallel.save(folder, self.model, self.optimizer),
                                       load_state=lambda folder: self.parallel.load(folder, self.model, self.optimizer))
        if accelerator.is_main_process:
            for name in self.checkpoints.remove_unfinished():
                self._print(f"removed {name}: a checkpoint a crash or a full disk left unfinished")
        self.log_file = self.output_dir / "log.jsonl"
        self.pictures_batch = None
        # skipping a non-finite step on the device needs the fused AdamW kernel's found_inf; fp16's
        # loss scaling (GradScaler) and an EMA (updated only on taken steps) read the flag instead
        self.skip_on_device = (self.parallel.torch_optimizer(self.optimizer).defaults.get("fused") is True
                               and self.accelerator.mixed_precision != "fp16" and self.ema is None)
        self.nonfinite_total = torch.zeros((), device=accelerator.device)
        self.nonfinite_streak = torch.zeros((), device=accelerator.device)

    def _hold_the_folder(self, state) -> None:
        """Rank 0 takes the output folder's lock for the whole run; every rank learns whether it could
        (a second run writing into the same folder would interleave logs and checkpoints)."""
        holder = self.lock.acquire() if state.is_main_process else None
        if state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            holder = broadcast_object_list([holder])[0]
        if holder is not None:
            raise ConfigError(f"another run is writing into {self.output_dir} ({holder}): wait for it to finish (a "
                              "preempted run is writing its checkpoint), stop it, or give another train.output_dir")

    # ---------------------------------------------------------------------------------------

    def run(self) -> int:
        plan = self.plan
        resumed = self._resume()
        if self.state.step >= plan.stop_step:
            return self._finish_a_finished_run()
        self._write_run_files(resumed)
        try:
            if self.state.evaluation_due:  # a stop abandoned it before the checkpoint: done now
                self._evaluate()
            exit_code = self._train()
        except StopRequested:
            return self._preempted()
        if exit_code is not None:
            return exit_code
        return self._finish(checkpoint=True)

    def _train(self) -> Optional[int]:
        """The steps, epoch after epoch, until the run's last step (None) or an exit code (the
        non-finite guard). A stop request raises StopRequested out of here (run() checkpoints)."""
        plan = self.plan
        progress = self._progress_bar()
        window = _Window()
        epoch = self.state.step // plan.steps_per_epoch
        skip = (self.state.step % plan.steps_per_epoch) * plan.accumulation
        try:
            while self.state.step < plan.stop_step:
                # closing: the epoch's loader workers end with it, however the loop is left
                with closing(self.data.epoch(epoch, skip_batches=skip)) as batches:
                    skip = 0
                    while self.state.step < plan.stop_step:
                        with self._abandonable():
                            self.preemption.check()  # every rank agrees, before the step's first batch
                            micro_batches = list(islice(batches, plan.accumulation))
                            if not micro_batches:
                                break  # the epoch's batches are done
                            loss_sum, metrics = self.accumulate_gradients(micro_batches)
                        stats = self.apply_update(loss_sum / len(micro_batches), metrics,
                                                  samples=sum(len(micro["labels"]) for micro in micro_batches))
                        window.add(stats, plan.global_batch)
                        progress.update(1)
                        step = self.state.step
                        if step % self.cfg.log.every == 0 or step == plan.stop_step:
                            self._log(window, epoch, progress)
                            window = _Window()
                        if step % self.cfg.log.images_every == 0 or step == plan.stop_step:
                            self._log_pictures(micro_batches[0])
                        self._evaluate_when_due()
                        exit_code = self._after_step()
                        if exit_code is not None:
                            return exit_code
                epoch += 1
        finally:
            progress.close()
        return None

    @contextmanager
    def _abandonable(self):
        """A part of the run a stop may abandon: a step before its update (its RNG draws and buffer
        updates are undone, its gradients dropped, so that the checkpoint is the state after the last
        complete step and a resumed run equals one that never stopped)."""
        start = self.step_start.capture()
        try:
            with self.preemption.step_in_progress():
                yield
        except StopRequested:
            self.step_start.restore(start)
            self.optimizer.zero_grad(set_to_none=True)
            raise

    def _preempted(self) -> int:
        """A stop was asked for: the checkpoint of the last complete step (unless there is one), exit 0."""
        self.preemption.clear()
        if self.state.step == 0:
            self._print("preempted before the first step: nothing to save; re-run the same command to start")
            return 0
        self._save_checkpoint()
        again = ("re-run the same command to resume" if not starts_over(self.cfg.resume) else
                 "re-run the command with resume=auto instead of resume=false to resume (with resume=false it "
                 "would start over, setting this run aside)")
        self._print(f"preempted: checkpoint written at step {self.state.step}; {again}")
        return 0

    def _finish_a_finished_run(self) -> int:
        """A run already at its last step is left as it is (its exports, metrics and logs). A stop after
        its last checkpoint but before its outputs were written left some of them missing or from an
        earlier end of the run (another train.max_steps): the final evaluation, exports and
        metrics.json are written now."""
        missing = self._outputs_not_of_this_step() if self.accelerator.is_main_process else []
        if self.accelerator.num_processes > 1:  # what rank 0 sees decides: the evaluation is a collective
            from accelerate.utils import broadcast_object_list

            missing = broadcast_object_list([missing])[0]
        where = f"the run in {self.output_dir} is at step {self.state.step} of {self.plan.stop_step}"
        if not missing:
            self._print(f"nothing to do: {where}")
            return 0
        self._print(f"{where} but {', '.join(missing)} {'was' if len(missing) == 1 else 'were'} not written at this "
                    "step (it was stopped before its end): writing its final outputs")
        return self._finish(checkpoint=False)  # the checkpoint of the last step is there: it was resumed

    def _outputs_not_of_this_step(self) -> list[str]:
        """The final outputs that are missing, or that record another step than the run's."""
        expected = ["model.json", "model.safetensors", "backbone.json", "backbone.safetensors"]
        expected += ["metrics.json"] if self.evaluator is not None else []
        wrong = []
        for name in expected:
            path = self.output_dir / name
            if name.endswith(".json"):
                try:
                    step = json.loads(path.read_text()).get("step")
                except (OSError, ValueError):
                    step = None
                if step != self.state.step:
                    wrong.append(name)
            elif not path.is_file():
                wrong.append(name)
        return wrong

    def _finish(self, checkpoint: bool) -> int:
        """The end of a run: the last checkpoint (first: the trained weights are safe before the long
        part), the final evaluation, the exports, metrics.json (last: its presence says all is done)."""
        if checkpoint:
            self._save_checkpoint()
        if self.state.step and self.state.nonfinite_total >= self.state.step:
            self._print(f"error: every one of the {self.state.step} optimizer steps was skipped (a non-finite loss or "
                        "gradient): the model was never updated, so nothing is exported. Check the inputs and the "
                        "task's settings (the validation refuses the usual causes); lower optim.blr or set "
                        "optim.clip_grad", error=True)
            return 1
        try:
            final = self._evaluate() if self.evaluator is not None else None
        except StopRequested:
            self.preemption.clear()
            self._print(f"preempted during the final evaluation: the checkpoint of step {self.state.step} is written; "
                        "re-run the same command to write the final evaluation, exports and metrics.json")
            return 0
        self._export()
        self._write_metrics(final)
        self.accelerator.end_training()
        skipped = (f" ({self.state.nonfinite_total} skipped: non-finite loss or gradient)"
                   if self.state.nonfinite_total else "")
        self._print(f"done: {self.state.step} steps{skipped}, {self.state.samples_seen} samples; outputs in "
                    f"{self.output_dir}")
        return 0

    def close(self) -> None:
        close_processes(self.accelerator)

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
        """Measure (a stop may abandon it: it is then redone first when the run resumes), then record:
        the log, TensorBoard and, for top-k tasks, the best model (never abandoned half-way)."""
        from .outputs import describe_metrics

        try:
            metrics = self.evaluator(ema_module=self.ema.module if self.ema is not None else None)
        except StopRequested:
            self.state.evaluation_due = True
            raise
        self.state.evaluation_due = False
        # TensorBoard: the accuracies (k-NN ones named so), not the constants beside them
        prefix = "knn_" if metrics["protocol"] == "knn" else ""
        scalars = {f"val/{prefix}{k}": v for k, v in metrics.items() if k.endswith(("top1", "top5"))}
        scalars.update({f"val/holdout_{k}": v for k, v in metrics.get("holdout", {}).items() if k.endswith("top1")})
        self.accelerator.log(scalars, step=self.state.samples_seen)
        if self.accelerator.is_main_process:
            with self.log_file.open("a") as f:
                f.write(json.dumps({"step": self.state.step, "samples": self.state.samples_seen, "eval": metrics}) + "\n")
        self._print(f"step {self.state.step}: {describe_metrics(metrics)}")
        if metrics["protocol"] == "top-k":
            score = metrics.get("holdout", metrics)["top1"]  # choices are made on the held-out part when there is one
            if score > self.state.best.get("score", -1.0):
                self.state.best = {**{k: v for k, v in metrics.items() if k != "heads"}, "score": score,
                                   "step": self.state.step, "epoch": self.state.step / self.plan.steps_per_epoch}
                self._export(best=True)
        return metrics

    def _write_metrics(self, final: Optional[dict]) -> None:
        if final is None or not self.accelerator.is_main_process:
            return
        from .outputs import write_metrics

        print(write_metrics(self.output_dir, self.cfg, final, step=self.state.step,
                            best=self.state.best if final["protocol"] == "top-k" else None))

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over `accumulation` micro-batches (or fewer at a data shortfall). Nothing
        is read back to the host: the loss, the metrics and the decision to skip a non-finite step
        stay on the device (numbers are read when they are logged, `_Window.summary`)."""
        loss_sum, metrics = self.accumulate_gradients(micro_batches)
        return self.apply_update(loss_sum / max(1, len(micro_batches)), metrics,
                                 samples=sum(len(micro["labels"]) for micro in micro_batches))

    def accumulate_gradients(self, micro_batches: list[dict]):
        """Forward and backward of each micro-batch; DDP all-reduces on the last one. The loss and the
        task's metrics are summed on the device. A non-finite loss is not looked at here: its
        gradients make the step's gradient norm non-finite, and apply_update skips the step."""
        import torch

        accelerator = self.accelerator
        loss_sum, metrics = torch.zeros((), device=accelerator.device), {}
        for index, micro in enumerate(micro_batches):
            if index:
                self.preemption.check()  # several processes: every rank leaves the step at the same micro-batch
            batch = self._to_device(micro)
            with self.parallel.accumulate(self.model, last=index == len(micro_batches) - 1):
                output = self.model(batch)
                self.parallel.backward(output.loss, len(micro_batches))
            loss_sum = loss_sum + output.loss.detach().float()
            for name, value in output.metrics.items():
                value = torch.as_tensor(value, dtype=torch.float32, device=accelerator.device).detach()
                metrics[name] = metrics.get(name, 0.0) + value / len(micro_batches)
        return loss_sum, metrics

    def apply_update(self, loss, metrics: dict, samples: int) -> dict:
        """Clip, then update unless the step is not finite (a non-finite loss on any rank, or gradient
        norm: the norm of all-reduced gradients, equal on every rank). With fused AdamW the skip is
        decided on the device (the kernel's found_inf, as GradScaler uses it); optimizers without it,
        fp16's loss scaling and EMA updates read the one flag back, once per step."""
        import torch

        from .optim import set_lr

        accelerator, cfg = self.accelerator, self.cfg
        max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad else float("inf")
        grad_norm = self.parallel.clip_grad_norm_(self.task.parameters(), max_norm)
        loss_bad = (~torch.isfinite(loss)).float()
        if accelerator.num_processes > 1:
            loss_bad = accelerator.reduce(loss_bad, reduction="sum")
        skipped = ((loss_bad > 0) | ~torch.isfinite(grad_norm)).float()  # [], 1.0 = skipped
        lr = self.schedule(self.state.step)
        set_lr(self.optimizer, lr)
        inner = self.parallel.torch_optimizer(self.optimizer)
        if self.skip_on_device:
            inner.found_inf = skipped
            self.optimizer.step()
        elif not skipped.item():
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.task, step=self.state.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total = self.nonfinite_total + skipped
        self.nonfinite_streak = (self.nonfinite_streak + 1) * skipped
        self.state.step += 1
        self.state.samples_seen += samples * accelerator.num_processes
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": skipped, **metrics}

    def _read_counters(self) -> None:
        """The device-side count of skipped steps into the state (at logs and checkpoints)."""
        self.state.nonfinite_total = int(self.nonfinite_total)
        self.state.nonfinite_streak = int(self.nonfinite_streak)

    # ---------------------------------------------------------------------------------------

    def _to_device(self, micro: dict) -> dict:
        device = self.accelerator.device
        batch = {key: value.to(device, non_blocking=True) for key, value in micro.items()
                 if hasattr(value, "to")}  # images or cached features, labels (and e.g. fixed MAE noise)
        if "images" in batch:
            batch["images"] = self.normalize(batch["images"], training=True)
        return batch

    def _after_step(self) -> Optional[int]:
        """Periodic checkpoints and the non-finite guard, decided the same way on every rank (the
        skipped-step counters are equal on every rank; they are read back at log and checkpoint steps).
        Stop requests are taken before each step and micro-batch (_train, accumulate_gradients)."""
        cfg, step = self.cfg, self.state.step
        if step % cfg.log.every == 0 or step % cfg.train.checkpoint_every == 0 or step >= self.plan.stop_step:
            self._read_counters()
        if self.state.nonfinite_streak >= cfg.train.max_nonfinite_steps:
            self._save_checkpoint()
            self._print(f"stopping: {self.state.nonfinite_streak} optimizer steps in a row had a non-finite loss or "
                        f"gradient ({self.state.nonfinite_total} in all); checkpoint at step {self.state.step}. Lower "
                        "optim.blr, set optim.clip_grad, or use train.precision=bf16 instead of fp16", error=True)
            return 1
        if step % cfg.train.checkpoint_every == 0 and step < self.plan.stop_step:
            self._save_checkpoint()
        return None

    # --- checkpoints ------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        self._read_counters()
        self.checkpoints.save(self.state, ema=self.ema, config_text=config.to_yaml(self.cfg))

    def _resume(self) -> bool:
        """Resume from the checkpoint resume= asks for, once `check_resume` said it is this recipe's.
        Nothing of two runs is mixed: starting over moves an old run aside, going back to an older
        checkpoint moves the newer ones aside, and the log keeps each step once."""
        from .run_folder import check_resume, set_aside

        path = self._on_main_process(lambda: check_resume(self.cfg, OmegaConf.to_container(self.cfg, resolve=True)))
        if self.accelerator.is_main_process:
            moved = None
            if starts_over(self.cfg.resume):
                moved = set_aside(self.output_dir, run_files(self.output_dir),
                                  "resume=false: a new run started in this folder")
            elif path is not None and self.checkpoints.newer_than(path):
                newer = [str(p.relative_to(self.output_dir)) for p in self.checkpoints.newer_than(path)]
                moved = set_aside(self.output_dir, newer, f"resume={self.cfg.resume}: the run went back to {path.name}")
            if moved is not None:
                self._print(f"set aside in {moved}: what this run would otherwise have mixed with its own")
        self.accelerator.wait_for_everyone()
        if path is not None:
            import torch

            self.state, note = self.checkpoints.load(path, ema=self.ema)
            self._print(f"resumed from {path} at step {self.state.step}{note}")
            device = self.accelerator.device
            self.nonfinite_total = torch.tensor(float(self.state.nonfinite_total), device=device)
            self.nonfinite_streak = torch.tensor(float(self.state.nonfinite_streak), device=device)
            if self.accelerator.is_main_process and self.log_file.is_file():  # the steps after it are redone
                lines = self.log_file.read_text().splitlines()
                kept = [line for line in lines if json.loads(line)["step"] <= self.state.step]
                if len(kept) < len(lines):
                    self.log_file.write_text("".join(line + "\n" for line in kept))
        return path is not None

    def _on_main_process(self, decide):
        """`decide()` on the main process (it reads files: verifying a checkpoint reads every byte),
        its answer, or its ConfigError, on every rank."""
        answer, error = None, None
        if self.accelerator.is_main_process:
            try:
                answer = decide()
            except ConfigError as problem:
                error = str(problem)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            answer, error = broadcast_object_list([answer, error])
        if error is not None:
            raise ConfigError(error)
        return answer

    def _write_run_files(self, resumed: bool) -> None:
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        header = "".join(f"# {line}\n" for line in (
            f"resolved recipe {self.cfg.recipe!r}, written by pretrain.py; reusable as recipe=<this file>",
            "derived: " + self.plan.describe()))
        (self.output_dir / "config.yaml").write_text(header + config.to_yaml(self.cfg))
        (self.output_dir / "plan.json").write_text(json.dumps(asdict(self.plan), indent=1) + "\n")
        # no hparams (plan.json has them; TensorBoard would show them as a second, empty run); a resumed
        # run drops the events a crash left after its checkpoint (it logs those steps again)
        purge = {"purge_step": self.state.samples_seen + 1} if resumed else {}
        self.accelerator.init_trackers("", init_kwargs={"tensorboard": purge})
        self._print(("resuming: " if resumed else "starting: ") + self.plan.describe())

    # --- logging ----------------------------------------------------------------------------

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(total=self.plan.stop_step, initial=self.state.step, desc=self.cfg.recipe, unit="step",
                    dynamic_ncols=True, disable=not self.accelerator.is_main_process)

    def _log(self, window: "_Window", epoch: int, progress) -> None:
        values = window.summary()
        self._read_counters()
        values.update(step=self.state.step, samples=self.state.samples_seen, epoch=epoch,
                      nonfinite_total=self.state.nonfinite_total)
        progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{values['img_s']:.0f}")
        if self.accelerator.is_main_process:
            with self.log_file.open("a") as f:
                f.write(json.dumps(values) + "\n")
        # curves against images seen compare runs of any batch size or process count; the step is the
        # axis's other name, and the skipped-step counts are drawn only once there is something to see
        curves = {f"train/{k}": v for k, v in values.items() if k not in ("samples", "step")
                  and not (k in ("skipped", "nonfinite_total") and not v)}
        self.accelerator.log(curves, step=self.state.samples_seen)

    def _log_pictures(self, micro: dict) -> None:
        """The same few images every time, to watch them improve: what the task draws of them (an
        MAE's reconstructions of its first training images, a classifier's attention maps of the
        first validation images). Under FSDP every rank draws (the forward gathers the shards on
        all of them), rank 0 logs."""
        if not self.cfg.log.tensorboard or not (self.accelerator.is_main_process or self.parallel.sharded):
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
        if self.accelerator.is_main_process:
            tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
            for tag, grid in pictures.items():
                tracker.add_image(tag, grid, global_step=self.state.samples_seen)

    def _print(self, message: str, error: bool = False) -> None:
        if self.accelerator.is_main_process:
            print(message, file=sys.stderr if error else sys.stdout, flush=True)

    # --- outputs ----------------------------------------------------------------------------

    def _export(self, best: bool = False) -> None:
        """backbone.safetensors and model.safetensors (each with its JSON), or model_best.safetensors.
        Every rank calls it: under FSDP the whole weights are gathered first (a collective)."""
        from .outputs import export_run
        from .tasks import task_class

        task = self.parallel.full_task(self.task, lambda: task_class(self.cfg.task.name).build(self.cfg,
                                                                                                self.plan.num_classes))
        if self.accelerator.is_main_process:
            export_run(task, self.output_dir, self.cfg, self.state.step, self.state.samples_seen,
                       best=self.state.best if best else None, classes=self.classes)


class _Window:
    """Running means between two log lines, kept on the device (no read-back per step), and the
    throughput over that time. Non-finite values (a skipped step's loss) are left out of the means."""

    def __init__(self):
        self.start, self.steps, self.samples, self.sums, self.counts, self.last = time.perf_counter(), 0, 0, {}, {}, {}

    def add(self, stats: dict, samples: int) -> None:
        import torch

        self.steps += 1
        self.samples += samples
        for key, value in stats.items():
            if key == "lr":
                self.last[key] = value  # the latest
            elif key == "skipped":
                self.sums[key] = self.sums.get(key, 0.0) + value  # how many, not a mean
            else:
                value = torch.as_tensor(value, dtype=torch.float32)
                finite = torch.isfinite(value)
                self.sums[key] = self.sums.get(key, 0.0) + torch.where(finite, value, torch.zeros_like(value))
                self.counts[key] = self.counts.get(key, 0.0) + finite.float()

    def summary(self) -> dict:
        """The means, read back from the device at once."""
        import torch

        elapsed = time.perf_counter() - self.start
        keys = list(self.sums)
        numbers = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32).float().reshape(()).cpu()
                               for k in keys]).tolist() if keys else []
        counts = {k: float(torch.as_tensor(v).sum()) for k, v in self.counts.items()}
        values = {k: (v if k == "skipped" else (v / counts[k] if counts.get(k) else float("nan")))
                  for k, v in zip(keys, numbers)}
        values.update(self.last)
        values.setdefault("loss", float("nan"))
        values["img_s"] = self.samples / elapsed if elapsed > 0 else 0.0
        return values


def _stop_group(accelerator):
    """A gloo process group on which the ranks agree on stop requests: a CPU tensor, so the agreement
    never waits for the device (NCCL would). None with one process."""
    if accelerator.num_processes <= 1:
        return None
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def close_processes(accelerator) -> None:
    """End the process group once every rank is done: a rank that exits while the others still talk
    (or with its group alive) can abort in gloo's threads ("terminate called without an active
    exception"), failing a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()


def mixed_precision(name: str) -> str:
    """auto: bf16 autocast where the device computes in bf16 natively (a GPU that supports it, a CPU with
    AVX512-BF16 or AMX, as torch reports them), fp32 elsewhere (on an AVX2-only CPU bf16 is emulated,
    many times slower than fp32)."""
    if name != "auto":
        return name
    import torch

    from .flops import native_bf16

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if native_bf16(device) else "no"
