"""The one training loop every task runs in: `accelerate launch pretrain.py recipe=NAME [key=value ...]`.

    parts (parts.py): plan, Accelerator, task, data, optimizer, evaluation protocol, checkpoints
    resume (resume.py) from the newest whole checkpoint, if any
    for each optimizer step:     a stop request is taken before every step and micro-batch; with one
        micro-batches -> step     process at once inside a step, which is then abandoned (its RNG draws
        log, pictures             and buffer updates undone): the last complete step is checkpointed,
        evaluate when due         within the launchers' grace windows (docs/faults.md)
        checkpoint, non-finite guard
    the last checkpoint, the final evaluation, the exports, metrics.json (last)

The loop knows nothing about MAE or DeiT: it calls the task contract (tasks/base.py) and the
evaluation protocol the task names (eval/protocols.py).
"""
from __future__ import annotations

from contextlib import closing, contextmanager
from itertools import islice
from typing import Optional

from ..recipes import to_yaml
from .logbook import Logbook, Window
from .outputs import describe_metrics, export_run, write_metrics
from .parts import build_parts, close_processes
from .resume import outputs_not_of_this_step, resume
from .state import starts_over
from .step import Step
from .stops import StopRequested


class Trainer:
    def __init__(self, cfg):
        self.parts = build_parts(cfg)
        self.step, self.logbook = Step(self.parts), Logbook(self.parts)
        self.cfg, self.plan, self.accelerator, self.task = cfg, self.parts.plan, self.parts.accelerator, self.parts.task

    def run(self) -> int:
        resumed = resume(self.parts, self.logbook)
        self.step = Step(self.parts)  # its skipped-step counters from the resumed state
        state = self.parts.state
        if state.step >= self.plan.stop_step:
            return self._finish_a_finished_run()
        self.logbook.start(resumed)
        try:
            if state.evaluation_due:  # a stop abandoned it before the checkpoint: done now
                self._evaluate()
            exit_code = self._train()
        except StopRequested:
            return self._preempted()
        return exit_code if exit_code is not None else self._finish(checkpoint=True)

    def _train(self) -> Optional[int]:
        """The steps, epoch after epoch, until the run's last step (None) or an exit code (the non-finite
        guard). A stop request raises StopRequested out of here (run() checkpoints)."""
        parts, plan, state = self.parts, self.plan, self.parts.state
        progress, window = self.logbook.progress_bar(), Window()
        epoch = state.step // plan.steps_per_epoch
        skip = (state.step % plan.steps_per_epoch) * plan.accumulation
        try:
            while state.step < plan.stop_step:
                # closing: the epoch's loader workers end with it, however the loop is left
                with closing(parts.data.epoch(epoch, skip_batches=skip)) as batches:
                    skip = 0
                    while state.step < plan.stop_step:
                        with self._abandonable():
                            parts.preemption.check()  # every rank agrees, before the step's first batch
                            micro_batches = list(islice(batches, plan.accumulation))
                            if not micro_batches:
                                break  # the epoch's batches are done
                            loss_sum, metrics = self.step.accumulate_gradients(micro_batches)
                        window.add(self.step.apply_update(loss_sum / len(micro_batches), metrics,
                                                          samples=sum(len(m["labels"]) for m in micro_batches)),
                                   plan.global_batch)
                        progress.update(1)
                        if state.step % self.cfg.log.every == 0 or state.step == plan.stop_step:
                            self.step.read_counters()
                            self.logbook.steps(window, epoch, progress)
                            window = Window()
                        if state.step % self.cfg.log.images_every == 0 or state.step == plan.stop_step:
                            self.logbook.pictures(micro_batches[0])
                        if parts.protocol is not None and state.step < plan.stop_step and \
                                parts.protocol.due(state.step, plan):
                            self._evaluate()
                        exit_code = self._after_step()
                        if exit_code is not None:
                            return exit_code
                epoch += 1
        finally:
            progress.close()
        return None

    @contextmanager
    def _abandonable(self):
        """A step before its update, which a stop may abandon: its RNG draws and buffer updates are
        undone and its gradients dropped, so that the checkpoint is the state after the last complete
        step and a resumed run equals one that never stopped."""
        parts = self.parts
        start = parts.step_start.capture()
        try:
            with parts.preemption.step_in_progress():
                yield
        except StopRequested:
            parts.step_start.restore(start)
            parts.optimizer.zero_grad(set_to_none=True)
            raise

    def _after_step(self) -> Optional[int]:
        """Periodic checkpoints and the non-finite guard, decided the same way on every rank (the
        skipped-step counters are equal on every rank; they are read back at log and checkpoint steps)."""
        cfg, state = self.cfg, self.parts.state
        if state.step % cfg.train.checkpoint_every == 0 or state.step >= self.plan.stop_step:
            self.step.read_counters()
        if state.nonfinite_streak >= cfg.train.max_nonfinite_steps:
            self._save_checkpoint()
            self.parts.print(f"stopping: {state.nonfinite_streak} optimizer steps in a row had a non-finite loss or "
                             f"gradient ({state.nonfinite_total} in all); checkpoint at step {state.step}. Lower "
                             "optim.blr, set optim.clip_grad, or use train.precision=bf16 instead of fp16", error=True)
            return 1
        if state.step % cfg.train.checkpoint_every == 0 and state.step < self.plan.stop_step:
            self._save_checkpoint()
        return None

    def _preempted(self) -> int:
        """A stop was asked for: the checkpoint of the last complete step (unless there is one), exit 0."""
        self.parts.preemption.clear()
        step = self.parts.state.step
        if step == 0:
            self.parts.print("preempted before the first step: nothing to save; re-run the same command to start")
            return 0
        self._save_checkpoint()
        again = ("re-run the same command to resume" if not starts_over(self.cfg.resume) else
                 "re-run the command with resume=auto instead of resume=false to resume (with resume=false it "
                 "would start over, setting this run aside)")
        self.parts.print(f"preempted: checkpoint written at step {step}; {again}")
        return 0

    def _finish_a_finished_run(self) -> int:
        """A run already at its last step is left as it is. A stop after its last checkpoint but before
        its outputs were written left some missing or of an earlier end: they are written now."""
        missing = outputs_not_of_this_step(self.parts)  # a collective: what rank 0 sees decides
        where = f"the run in {self.parts.output_dir} is at step {self.parts.state.step} of {self.plan.stop_step}"
        if not missing:
            self.parts.print(f"nothing to do: {where}")
            return 0
        self.parts.print(f"{where} but {', '.join(missing)} {'was' if len(missing) == 1 else 'were'} not written at "
                         "this step (it was stopped before its end): writing its final outputs")
        return self._finish(checkpoint=False)  # the checkpoint of the last step is there: it was resumed

    def _finish(self, checkpoint: bool) -> int:
        """The end of a run: the last checkpoint (first: the trained weights are safe before the long
        part), the final evaluation, the exports, metrics.json (last: its presence says all is done)."""
        parts, state = self.parts, self.parts.state
        if checkpoint:
            self._save_checkpoint()
        if state.step and state.nonfinite_total >= state.step:
            parts.print(f"error: every one of the {state.step} optimizer steps was skipped (a non-finite loss or "
                        "gradient): the model was never updated, so nothing is exported. Check the inputs and the "
                        "task's settings (the validation refuses the usual causes); lower optim.blr or set "
                        "optim.clip_grad", error=True)
            return 1
        try:
            final = self._evaluate() if parts.protocol is not None else None
        except StopRequested:
            parts.preemption.clear()
            parts.print(f"preempted during the final evaluation: the checkpoint of step {state.step} is written; "
                        "re-run the same command to write the final evaluation, exports and metrics.json")
            return 0
        self.export(evaluation=final)
        if final is not None and parts.accelerator.is_main_process:
            print(write_metrics(parts.output_dir, self.cfg, final, step=state.step,
                                best=state.best if parts.protocol.keeps_best else None))
        parts.accelerator.end_training()
        skipped = f" ({state.nonfinite_total} skipped: non-finite loss or gradient)" if state.nonfinite_total else ""
        parts.print(f"done: {state.step} steps{skipped}, {state.samples_seen} samples; outputs in {parts.output_dir}")
        return 0

    def _evaluate(self) -> dict:
        """Measure (a stop may abandon it: it is then redone first when the run resumes), then record:
        the log, TensorBoard, and the best model by the protocol's rule (never abandoned half-way)."""
        parts, state = self.parts, self.parts.state
        try:
            metrics = parts.protocol.measure(ema_module=parts.ema.module if parts.ema is not None else None)
        except StopRequested:
            state.evaluation_due = True
            raise
        state.evaluation_due = False
        self.logbook.evaluation(metrics, describe_metrics(metrics))
        best = parts.protocol.best(metrics, state.best, state.step, state.step / self.plan.steps_per_epoch)
        if best is not None:
            state.best = best
            self.export(best=best)
        return metrics

    def _save_checkpoint(self) -> None:
        self.step.read_counters()
        self.parts.checkpoints.save(self.parts.state, ema=self.parts.ema, config_text=to_yaml(self.cfg))

    def export(self, evaluation: Optional[dict] = None, best: Optional[dict] = None) -> None:
        """backbone.safetensors and model.safetensors (each with its JSON), or model_best.safetensors.
        Every rank calls it: under FSDP the whole weights are gathered first (a collective)."""
        parts = self.parts
        task = parts.parallel.full_task(parts.task, lambda: type(parts.task).build(self.cfg, self.plan.num_classes))
        if parts.accelerator.is_main_process:
            export_run(task, parts.output_dir, self.cfg, parts.state.step, parts.state.samples_seen,
                       evaluation=evaluation, best=best, classes=parts.classes)

    def close(self) -> None:
        close_processes(self.accelerator)

    # what scripts and tests reach for
    def train_step(self, micro_batches: list[dict]) -> dict:
        return self.step(micro_batches)

    @property
    def state(self):
        return self.parts.state

    @property
    def data(self):
        return self.parts.data

    @property
    def parallel(self):
        return self.parts.parallel

    @property
    def encoder(self):
        return self.parts.task.encoder
