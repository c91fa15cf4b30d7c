"""One optimizer step: the micro-batches' forward and backward (DDP all-reduces on the last), clipping,
the lr of the schedule, the update, and the skip of a non-finite step, decided on every rank alike.

Nothing is read back to the host: the loss, the metrics and the decision to skip stay on the device
(numbers are read when they are logged, run/logbook.py). With fused AdamW the skip is decided on the
device (the kernel's found_inf, as GradScaler uses it); optimizers without it, fp16's loss scaling and
EMA updates read the one flag back, once per step.
"""
from __future__ import annotations

import torch

from ..tasks import Progress
from .optim import set_lr, set_weight_decay
from .parts import RunParts


class Step:
    def __init__(self, parts: RunParts):
        self.parts = parts
        device = parts.accelerator.device
        # skipping a non-finite step on the device needs the fused AdamW kernel's found_inf; fp16's
        # loss scaling (GradScaler) and an EMA (updated only on taken steps) read the flag instead
        # and a task's step hooks (run after taken updates only) read the flag too
        self.on_device = (parts.parallel.torch_optimizer(parts.optimizer).defaults.get("fused") is True
                          and parts.accelerator.mixed_precision != "fp16" and parts.ema is None
                          and not parts.task.has_step_hooks())
        self.nonfinite_total = torch.tensor(float(parts.state.nonfinite_total), device=device)
        self.nonfinite_streak = torch.tensor(float(parts.state.nonfinite_streak), device=device)

    def __call__(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over `accumulation` micro-batches (or fewer at a data shortfall)."""
        loss_sum, metrics = self.accumulate_gradients(micro_batches)
        return self.apply_update(loss_sum / max(1, len(micro_batches)), metrics,
                                 samples=sum(len(micro["labels"]) for micro in micro_batches))

    def accumulate_gradients(self, micro_batches: list[dict]):
        """Forward and backward of each micro-batch. The loss and the task's metrics are summed on the
        device. A non-finite loss is not looked at here: its gradients make the step's gradient norm
        non-finite, and apply_update skips the step."""
        parts = self.parts
        device = parts.accelerator.device
        loss_sum, metrics = torch.zeros((), device=device), {}
        parts.task.start_step(self.progress())
        for index, micro in enumerate(micro_batches):
            if index:
                parts.preemption.check()  # several processes: every rank leaves the step at the same micro-batch
            batch = self.to_device(micro)
            with parts.parallel.accumulate(parts.model, last=index == len(micro_batches) - 1):
                output = parts.model(batch)
                parts.parallel.backward(output.loss, len(micro_batches))
            loss_sum = loss_sum + output.loss.detach().float()
            for name, value in output.metrics.items():
                value = torch.as_tensor(value, dtype=torch.float32, device=device).detach()
                metrics[name] = metrics.get(name, 0.0) + value / len(micro_batches)
        return loss_sum, metrics

    def apply_update(self, loss, metrics: dict, samples: int) -> dict:
        """Clip, then update unless the step is not finite (a non-finite loss on any rank, or gradient
        norm: the norm of all-reduced gradients, equal on every rank)."""
        parts = self.parts
        accelerator, state = parts.accelerator, parts.state
        max_norm = parts.cfg.optim.clip_grad if parts.cfg.optim.clip_grad else float("inf")
        grad_norm = parts.parallel.clip_grad_norm_(parts.task.parameters(), max_norm)
        loss_bad = (~torch.isfinite(loss)).float()
        if accelerator.num_processes > 1:
            loss_bad = accelerator.reduce(loss_bad, reduction="sum")
        skipped = ((loss_bad > 0) | ~torch.isfinite(grad_norm)).float()  # [], 1.0 = skipped
        lr = parts.schedule(state.step)
        set_lr(parts.optimizer, lr)
        scheduled = {}
        if parts.weight_decay is not None:
            scheduled["wd"] = parts.weight_decay(state.step)
            set_weight_decay(parts.optimizer, scheduled["wd"])
        if self.on_device:
            parts.parallel.torch_optimizer(parts.optimizer).found_inf = skipped
            parts.optimizer.step()
        elif not skipped.item():
            parts.optimizer.step()
            parts.task.after_update(self.progress())
            if parts.ema is not None:
                parts.ema.update(parts.task, step=state.step)
        parts.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total = self.nonfinite_total + skipped
        self.nonfinite_streak = (self.nonfinite_streak + 1) * skipped
        state.step += 1
        state.samples_seen += samples * accelerator.num_processes
        return {"loss": loss, "lr": lr, **scheduled, "grad_norm": grad_norm, "skipped": skipped, **metrics}

    def progress(self) -> Progress:
        """Where the run is, for the task's step hooks: the index of the update at hand."""
        plan = self.parts.plan
        return Progress(self.parts.state.step, plan.total_steps, plan.steps_per_epoch)

    def read_counters(self) -> None:
        """The device-side count of skipped steps into the state (at logs and checkpoints)."""
        self.parts.state.nonfinite_total = int(self.nonfinite_total)
        self.parts.state.nonfinite_streak = int(self.nonfinite_streak)

    def to_device(self, micro: dict) -> dict:
        parts = self.parts
        device = parts.accelerator.device
        batch = {key: ([view.to(device, non_blocking=True) for view in value] if isinstance(value, list)
                       else value.to(device, non_blocking=True)) for key, value in micro.items()
                 if isinstance(value, torch.Tensor) or (isinstance(value, list) and value
                                                        and isinstance(value[0], torch.Tensor))}
        # images (a list of views of several sizes: multi-crop) or cached features, labels (and e.g. fixed MAE noise)
        if "images" in batch:
            batch["images"] = parts.normalize(batch["images"], training=True)
        return batch
