"""What makes a run resumable: its state between steps, its checkpoints, and how it is asked to stop.

    checkpoints/step_XXXXXXXX/   written as .step_XXXXXXXX.tmp and renamed when complete (a crash
                                 leaves a .tmp that is ignored); the last train.keep_checkpoints kept
        Accelerate's save_state  model, optimizer, every rank's RNG states
        ema.safetensors          the EMA weights, when train.ema_decay is set
        train_state.json         TrainState: step, samples seen, skipped steps, best evaluation
        config.yaml              the resolved recipe the checkpoint was trained with (run_folder.py)
        manifest.json            every file and its size: a truncated or missing file makes the
                                 checkpoint incomplete, and resuming falls back to the previous one

Asking a run to stop: SIGTERM, SIGUSR1 or SIGINT (Ctrl-C; a second one stops at once) to the
training processes, the launcher dying (Linux tells a launched rank), or a STOP file; each ends in a
checkpoint and exit code 0. Loader workers ignore these signals: the trainer decides.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
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
    init_sha256: Optional[str] = None            # the file the run started from, to notice it changed


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def starts_over(resume: str) -> bool:
    return str(resume).lower() in ("false", "no", "off", "none")


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's start: the signals that ask for a checkpoint are the trainer's to handle
    (`timeout`, `kill -TERM -PGID` and Ctrl-C reach the whole process group; a worker that died of
    them first took the run down with it)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_ASKED_EARLY = []  # stop signals that came before the trainer existed (while it imported and built)


def catch_stop_signals_early() -> None:
    """From a command's first line: a stop signal during start-up (imports, data checks, building the
    model) is remembered and honoured as soon as the trainer can checkpoint, instead of killing it."""
    def remember(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in _ASKED_EARLY:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        _ASKED_EARLY.append(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, remember)


class Preemption:
    """Ways to ask a run for a checkpoint and a clean exit (code 0): SIGTERM, SIGUSR1 or SIGINT to the
    training processes (cluster preemption, `timeout`, Ctrl-C: a second Ctrl-C stops at once), the
    launcher dying (a launched rank asks Linux for SIGTERM then: `accelerate launch` with one process
    does not pass its signals on), or a file named STOP in the output folder (what
    tools/slurm_pretrain.sh creates when SLURM warns the job; it works whatever the launchers in
    between do with signals). The file is removed when the checkpoint is written."""

    def __init__(self, stop_file: Path, watch_file: bool, launched: bool = False):
        self.requested, self.stop_file, self.watch_file = bool(_ASKED_EARLY), stop_file, watch_file
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        if launched:
            _term_when_parent_dies()

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.requested = True

    def asked(self) -> bool:
        return self.requested or (self.watch_file and self.stop_file.exists())

    def clear(self) -> None:
        if self.watch_file:
            self.stop_file.unlink(missing_ok=True)


class Checkpoints:
    """The checkpoint folder of a run, used the same way on every rank (collective calls inside)."""

    def __init__(self, accelerator, directory: Path, keep: int, save_state=None, load_state=None):
        """`save_state(folder)` / `load_state(folder)`: the model's, optimizer's and RNGs' (Accelerate's
        save_state by default; torch's distributed checkpoint under FSDP, sharding.py)."""
        self.accelerator, self.directory, self.keep = accelerator, Path(directory), keep
        self.save_state = save_state or (lambda folder: accelerator.save_state(str(folder)))
        self.load_state = load_state or (lambda folder: accelerator.load_state(str(folder)))

    def complete(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir()
                      if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "train_state.json").is_file())

    def remove_unfinished(self) -> list[str]:
        """Delete the .tmp folders of checkpoints a crash (or a full disk) left half-written: they are
        never resumed from, and would keep the space the next checkpoint needs. Main process only."""
        if not self.directory.is_dir():
            return []
        stale = [p for p in self.directory.iterdir() if p.name.startswith(f".{CHECKPOINT_PREFIX}") and
                 p.name.endswith(".tmp")]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return [p.name for p in stale]

    def save(self, state: TrainState, ema=None, config_text: str = "") -> None:
        accelerator = self.accelerator
        final = self.directory / f"{CHECKPOINT_PREFIX}{state.step:08d}"
        if final.is_dir():
            return
        tmp = self.directory / f".{final.name}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            self.save_state(tmp)  # model, optimizer, every rank's RNG states
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                if ema is not None:
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()},
                              str(tmp / "ema.safetensors"))
                (tmp / "config.yaml").write_text(config_text)
                (tmp / "train_state.json").write_text(json.dumps(asdict(state), indent=1))
                manifest = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
                os.replace(tmp, final)  # complete only now: a crash before leaves a .tmp that is ignored
                for old in self.complete()[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except (OSError, RuntimeError) as error:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint only keeps the space
            raise _writing_error(error, final) from error
        accelerator.wait_for_everyone()

    def find(self, resume: str) -> Optional[Path]:
        """The checkpoint `resume=` asks for: auto (the newest complete one that is whole, if any: a
        damaged newest one is passed over with a warning), false, or a folder (which must be whole)."""
        if starts_over(resume):
            return None
        if resume.lower() == "auto":
            for path in reversed(self.complete()):
                problem = damaged(path)
                if problem is None:
                    return path
                print(f"warning: not resuming from {path}: {problem}; trying the checkpoint before it",
                      file=sys.stderr, flush=True)
            return None
        path = Path(resume)
        if not (path / "train_state.json").is_file():
            raise ConfigError(f"resume={resume}: not a complete checkpoint folder (no train_state.json); "
                              f"checkpoints live in {self.directory}")
        problem = damaged(path)
        if problem is not None:
            raise ConfigError(f"resume={resume}: {problem}; give an older checkpoint, or resume=auto to take the "
                              "newest whole one")
        return path

    def newer_than(self, path: Path) -> list[Path]:
        """This run's complete checkpoints after `path` (which a resume from `path` would leave stale)."""
        return [p for p in self.complete() if p.name > Path(path).name and p.resolve() != Path(path).resolve()]

    def load(self, path: Path, ema=None) -> tuple[TrainState, str]:
        """Restore model, optimizer, RNG (and EMA) from `path`; the TrainState and a note on a changed
        process count."""
        accelerator = self.accelerator
        self.load_state(path)
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


def damaged(path: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be resumed from exactly, or None: a file its manifest lists is
    missing or has another size (truncated), or one of the ranks' RNG states is missing."""
    try:
        saved = json.loads((path / "train_state.json").read_text())
    except (OSError, ValueError):
        return "train_state.json is unreadable"
    manifest_file = path / "manifest.json"
    if manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text())
        except ValueError:
            return "manifest.json is unreadable"
        for name, size in manifest.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, {size} were written (truncated or changed)"
    missing = [f"random_states_{rank}.pkl" for rank in range(saved.get("world_size", 1))
               if not (path / f"random_states_{rank}.pkl").is_file()]
    if missing:
        return f"{', '.join(missing)} missing (without every rank's RNG the run would not continue as it would have)"
    return None


def _writing_error(error: BaseException, final: Path) -> BaseException:
    """A failed checkpoint write, said plainly: a full disk is named as such (torch reports it as
    '[enforce fail at inline_container.cc:...]')."""
    import errno

    free = shutil.disk_usage(final.parent).free if final.parent.exists() else None
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or (
        "enforce fail" in str(error) and free is not None and free < 64 * 2 ** 20)
    if full:
        return ConfigError(f"disk full while writing checkpoint {final.name} in {final.parent} "
                           f"({(free or 0) / 2 ** 20:.0f} MB free): the unfinished copy was removed and the previous "
                           "checkpoint is intact; free space (or move train.output_dir) and re-run the same command")
    return error


def _term_when_parent_dies() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM): Linux sends this process SIGTERM when its parent (the
    launcher) exits. Only for processes a launcher started: a run under nohup must outlive its shell."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the STOP file and signals still work
        return
    if os.getppid() == 1:  # the launcher died before the call: nobody would send it
        os.kill(os.getpid(), signal.SIGTERM)
