"""What a run writes about itself while it trains: config.yaml and plan.json at its start, one line of
log.jsonl and one point of each TensorBoard curve every `log.every` steps (against images seen, so
curves compare across batch sizes and process counts), the evaluations, the task's pictures every
`log.images_every` steps, and a progress bar; from the main process only."""
from __future__ import annotations

import json
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from ..data.loaders import build_eval_loader
from ..recipes import to_yaml
from .parts import RunParts

PICTURE_IMAGES = 8  # images TensorBoard shows, the same ones every time


class Logbook:
    def __init__(self, parts: RunParts):
        self.parts, self.file = parts, parts.output_dir / "log.jsonl"
        self.pictures_batch = None

    def start(self, resumed: bool) -> None:
        """config.yaml (the resolved recipe, headed by the derived values) and plan.json; TensorBoard,
        dropping the events a crash left after the checkpoint a resumed run starts from."""
        parts = self.parts
        if not parts.accelerator.is_main_process:
            return
        parts.output_dir.mkdir(parents=True, exist_ok=True)
        header = "".join(f"# {line}\n" for line in (
            f"resolved recipe {parts.cfg.recipe!r}, written by pretrain.py; reusable as recipe=<this file>",
            "derived: " + parts.plan.describe()))
        (parts.output_dir / "config.yaml").write_text(header + to_yaml(parts.cfg))
        (parts.output_dir / "plan.json").write_text(json.dumps(asdict(parts.plan), indent=1) + "\n")
        # no hparams (plan.json has them; TensorBoard would show them as a second, empty run)
        purge = {"purge_step": parts.state.samples_seen + 1} if resumed else {}
        parts.accelerator.init_trackers("", init_kwargs={"tensorboard": purge})
        parts.print(("resuming: " if resumed else "starting: ") + parts.plan.describe())

    def keep_until(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: their lines go (each step is logged once)."""
        if self.parts.accelerator.is_main_process and self.file.is_file():
            lines = self.file.read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            if len(kept) < len(lines):
                self.file.write_text("".join(line + "\n" for line in kept))

    def progress_bar(self):
        parts = self.parts
        return tqdm(total=parts.plan.stop_step, initial=parts.state.step, desc=parts.cfg.recipe, unit="step",
                    dynamic_ncols=True, disable=not parts.accelerator.is_main_process)

    def steps(self, window: "Window", epoch: int, progress) -> None:
        """The window's means (one read-back), as a log line, TensorBoard points and the bar's postfix."""
        state = self.parts.state
        values = window.summary()
        values.update(step=state.step, samples=state.samples_seen, epoch=epoch, nonfinite_total=state.nonfinite_total)
        progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{values['img_s']:.0f}")
        self._append(values)
        # the step is the axis's other name; the skipped-step counts are drawn once there is something to see
        curves = {f"train/{k}": v for k, v in values.items() if k not in ("samples", "step")
                  and not (k in ("skipped", "nonfinite_total") and not v)}
        self.parts.accelerator.log(curves, step=state.samples_seen)

    def evaluation(self, metrics: dict, line: str) -> None:
        parts = self.parts
        parts.accelerator.log(parts.protocol.scalars(metrics), step=parts.state.samples_seen)
        self._append({"step": parts.state.step, "samples": parts.state.samples_seen, "eval": metrics})
        parts.print(f"step {parts.state.step}: {line}")

    def pictures(self, micro: dict) -> None:
        """The same few images every time, to watch them improve: what the task draws of them (an MAE's
        reconstructions of its first training images, a classifier's attention maps of the first
        validation images). Under FSDP every rank draws (the forward gathers the shards), rank 0 logs."""
        parts = self.parts
        if not parts.cfg.log.tensorboard or not (parts.accelerator.is_main_process or parts.parallel.sharded):
            return
        if self.pictures_batch is None:
            split = parts.task.picture_split()
            if split is None:  # nothing to watch (a frozen encoder, an encoder without maps)
                return
            if split == "train":
                self.pictures_batch = micro["images"][:PICTURE_IMAGES].clone()
            else:
                batch = next(iter(build_eval_loader(parts.cfg, split, batch_size=PICTURE_IMAGES)))
                self.pictures_batch = batch["images"][:PICTURE_IMAGES].clone()
        images = parts.normalize(self.pictures_batch.to(parts.accelerator.device))
        was_training = parts.task.training
        parts.task.eval()
        with parts.accelerator.autocast():
            pictures = parts.task.pictures(images, parts.normalize.denormalize)
        parts.task.train(was_training)
        if parts.accelerator.is_main_process:
            tracker = parts.accelerator.get_tracker("tensorboard", unwrap=True)
            for tag, grid in pictures.items():
                tracker.add_image(tag, grid, global_step=parts.state.samples_seen)

    def _append(self, record: dict) -> None:
        if self.parts.accelerator.is_main_process:
            with self.file.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Window:
    """Running means between two log lines, kept on the device (no read-back per step), and the
    throughput over that time. Non-finite values (a skipped step's loss) are left out of the means."""

    def __init__(self):
        self.start, self.steps, self.samples, self.sums, self.counts, self.last = time.perf_counter(), 0, 0, {}, {}, {}

    def add(self, stats: dict, samples: int) -> None:
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
