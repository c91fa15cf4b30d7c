"""What makes a run resumable: its state between steps, its checkpoints, and how it is asked to stop.

    checkpoints/step_XXXXXXXX/   written as .step_XXXXXXXX.tmp and renamed when complete (a crash
                                 leaves a .tmp that is ignored); the last train.keep_checkpoints kept
        Accelerate's save_state  model, optimizer, every rank's RNG states
        ema.safetensors          the EMA weights, when train.ema_decay is set
        train_state.json         TrainState: step, samples seen, skipped steps, best evaluation
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .config import ConfigError

CHECKPOINT_PREFIX = "step_"


@dataclass
class TrainState:
    """What a checkpoint needs beyond model, optimizer and RNG (which Accelerate saves); JSON."""
    step: int = 0
    samples_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    world_size: int = 1
    best: dict = field(default_factory=dict)     # the best evaluation so far (classification): metrics + step
    history: list = field(default_factory=list)  # resumes: [{"step":, "world_size":}]


class Preemption:
    """Ways to ask a run for a checkpoint and a clean exit (code 0): SIGTERM or SIGUSR1 to the
    training processes (cluster preemption), or a file named STOP in the output folder (what
    tools/slurm_pretrain.sh creates when SLURM warns the job; it works whatever the launchers in
    between do with signals). The file is removed when the checkpoint is written."""

    def __init__(self, stop_file: Path, watch_file: bool):
        self.requested, self.stop_file, self.watch_file = False, stop_file, watch_file
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def asked(self) -> bool:
        return self.requested or (self.watch_file and self.stop_file.exists())

    def clear(self) -> None:
        if self.watch_file:
            self.stop_file.unlink(missing_ok=True)


class Checkpoints:
    """The checkpoint folder of a run, used the same way on every rank (collective calls inside)."""

    def __init__(self, accelerator, directory: Path, keep: int):
        self.accelerator, self.directory, self.keep = accelerator, Path(directory), keep

    def complete(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir()
                      if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "train_state.json").is_file())

    def save(self, state: TrainState, ema=None) -> None:
        accelerator = self.accelerator
        final = self.directory / f"{CHECKPOINT_PREFIX}{state.step:08d}"
        if final.is_dir():
            return
        tmp = self.directory / f".{final.name}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # model, optimizer, every rank's RNG states
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if ema is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, str(tmp / "ema.safetensors"))
            (tmp / "train_state.json").write_text(json.dumps(asdict(state), indent=1))
            os.replace(tmp, final)  # complete only now: a crash before leaves a .tmp that is ignored
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def find(self, resume: str) -> Optional[Path]:
        """The checkpoint `resume=` asks for: auto (the newest complete one, if any), false, or a folder."""
        if resume.lower() in ("false", "no", "off", "none"):
            return None
        if resume.lower() == "auto":
            found = self.complete()
            return found[-1] if found else None
        path = Path(resume)
        if not (path / "train_state.json").is_file():
            raise ConfigError(f"resume={resume}: not a complete checkpoint folder (no train_state.json); "
                              f"checkpoints live in {self.directory}")
        return path

    def load(self, path: Path, ema=None) -> tuple[TrainState, str]:
        """Restore model, optimizer, RNG (and EMA) from `path`; the TrainState and a note on a changed
        process count."""
        accelerator = self.accelerator
        accelerator.load_state(str(path))
        if ema is not None and (path / "ema.safetensors").is_file():
            from safetensors.torch import load_file

            ema.module.load_state_dict(load_file(str(path / "ema.safetensors"), device=str(accelerator.device)))
        saved = json.loads((path / "train_state.json").read_text())
        state = TrainState(**saved)
        state.history.append({"step": state.step, "world_size": accelerator.num_processes})
        note = ""
        if saved["world_size"] != accelerator.num_processes:
            note = (f" (saved with {saved['world_size']} processes, now {accelerator.num_processes}: the global "
                    "batch and schedule are unchanged, the order of the data differs)")
        return state, note
