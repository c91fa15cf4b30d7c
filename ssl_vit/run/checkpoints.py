"""A run's checkpoints: written whole or not at all, the last K kept, verified before a resume.

    checkpoints/step_XXXXXXXX/   written as .step_XXXXXXXX.tmp and renamed when complete (a crash
                                 leaves a .tmp that is ignored); the last train.keep_checkpoints kept
        Accelerate's save_state  model, optimizer, every rank's RNG states
        ema.safetensors          the EMA weights, when train.ema_decay is set
        train_state.json         TrainState: step, samples seen, skipped steps, best evaluation
        config.yaml              the resolved recipe the checkpoint was trained with (run/folder.py)
        manifest.json            every file, its size and sha256: a missing, truncated or changed file
                                 makes the checkpoint damaged, and resuming falls back to the previous one
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file, save_file

from ..config import ConfigError
from .state import TrainState, starts_over

CHECKPOINT_PREFIX = "step_"


class Checkpoints:
    """The checkpoint folder of a run, used the same way on every rank (collective calls inside)."""

    def __init__(self, accelerator, directory: Path, keep: int, save_state=None, load_state=None):
        """`save_state(folder)` / `load_state(folder)`: the model's, optimizer's and RNGs' (Accelerate's
        save_state by default; torch's distributed checkpoint under FSDP, run/sharding.py)."""
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
                    save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()},
                              str(tmp / "ema.safetensors"))
                (tmp / "config.yaml").write_text(config_text)
                (tmp / "train_state.json").write_text(json.dumps(asdict(state), indent=1))
                manifest = {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
                            for p in sorted(tmp.iterdir()) if p.is_file()}
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
                os.replace(tmp, final)  # complete only now: a crash before leaves a .tmp that is ignored
                for old in self.complete()[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except Exception as error:  # safetensors' own error too, not an OSError: whatever failed the write
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint only keeps the space
            raise _writing_error(error, final) from error
        accelerator.wait_for_everyone()

    def find(self, resume: str) -> Optional[Path]:
        """The checkpoint `resume=` asks for: auto (the newest complete one that is whole, if any: a
        damaged newest one is passed over with a warning, and if every one is damaged the run stops:
        starting over would overwrite the run's exports and let keep_checkpoints delete the new
        checkpoints in favour of the damaged ones), false, or a folder (which must be whole).
        Verifying reads every file (its sha256): call it on one process and share the answer."""
        if starts_over(resume):
            return None
        if resume.lower() == "auto":
            problems = []
            for path in reversed(self.complete()):
                problem = damaged(path)
                if problem is None:
                    return path
                problems.append(f"{path.name}: {problem}")
                print(f"warning: not resuming from {path}: {problem}; trying the checkpoint before it",
                      file=sys.stderr, flush=True)
            if problems:
                raise ConfigError(f"every checkpoint in {self.directory} is damaged ({'; '.join(problems)}), so this "
                                  "run cannot resume: start over with resume=false (the old run, its damaged "
                                  f"checkpoints included, is moved into {self.directory.parent}/previous/), or give "
                                  "another train.output_dir")
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
    """Why a checkpoint folder cannot be resumed from exactly, or None. Its manifest.json lists every
    file with its size and sha256 when it was written: a file missing, of another size (truncated) or
    with other bytes (damaged in place: a disk, a copy, a hand) makes the checkpoint damaged, and so
    does a missing manifest (nothing could be verified) or a rank's RNG state that is missing or does
    not load (Accelerate would resume without it, silently: the run would not continue as it would
    have). Manifests written before checksums (sizes only) are verified by loading each file instead.
    Reads every byte: about 0.9 s per GB here (docs/faults.md)."""
    try:
        saved = json.loads((path / "train_state.json").read_text())
    except (OSError, ValueError):
        return "train_state.json is unreadable"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        return "it has no manifest.json, so its files cannot be verified"
    except (OSError, ValueError):
        return "manifest.json is unreadable"
    if not isinstance(manifest, dict):
        return "manifest.json is not a list of files"
    for name, written in manifest.items():
        file = path / name
        size, digest = (written.get("size"), written.get("sha256")) if isinstance(written, dict) else (written, None)
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written (truncated or changed)"
        if digest is not None and file_digest(file) != digest:
            return f"{name} does not have the bytes that were written (its sha256 differs: damaged in place)"
        if digest is None and (problem := _unloadable(file)):
            return problem
    for rank in range(saved.get("world_size", 1)):
        name = f"random_states_{rank}.pkl"
        if not (path / name).is_file():
            return f"{name} is missing (without every rank's RNG the run would not continue as it would have)"
        if manifest.get(name) is None and (problem := _unloadable(path / name)):
            return problem
    return None


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 22), b""):
            digest.update(piece)
    return digest.hexdigest()


def _unloadable(file: Path) -> Optional[str]:
    """Why a checkpoint file without a recorded checksum does not load, or None: safetensors files
    are read whole, torch's files loaded without running code (weights_only, with the NumPy types
    Accelerate's RNG states hold)."""
    try:
        if file.suffix == ".safetensors":
            load_file(str(file))
        elif file.suffix in (".bin", ".pt", ".pkl", ".pth"):
            if not isinstance(accelerate_load(file, map_location="cpu"), dict):
                return f"{file.name} does not hold a state (a dict)"
    except Exception as error:  # whatever the reader raises on damaged bytes: the file is damaged
        return f"{file.name} does not load ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return None


# what the writers say when the file system refuses a write (torch's and safetensors' own errors carry the
# OS's text, not an errno): the cause is the machine's, not a defect, so the run stops in one line
REFUSALS = {"No space left": "the disk is full", "File too large": "a file-size limit (ulimit -f) was reached",
            "Permission denied": "the folder is not writable", "Read-only file system": "the file system is read-only",
            "Operation not permitted": "the folder is not writable", "Disk quota exceeded": "the disk quota is used up"}


def _writing_error(error: BaseException, final: Path) -> BaseException:
    """A failed checkpoint write, said plainly when the file system refused it (a full disk: torch
    reports it as '[enforce fail at inline_container.cc:...]', safetensors as its own error); any other
    failure is a defect and keeps its traceback."""
    free = shutil.disk_usage(final.parent).free if final.parent.exists() else None
    text = f"{getattr(error, 'strerror', None) or ''} {error}"
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
            "enforce fail" in text and free is not None and free < 64 * 2 ** 20):
        text += " No space left"
    cause = next((why for sign, why in REFUSALS.items() if sign in text), None)
    if cause is None and isinstance(error, OSError) and error.errno is not None:
        cause = error.strerror or f"errno {error.errno}"
    if cause is None:
        return error
    space = f" ({free / 2 ** 20:.0f} MB free)" if free is not None else ""
    return ConfigError(f"could not write checkpoint {final.name} in {final.parent}: {cause}{space}; "
                       f"{str(error).splitlines()[0][:200]}. The unfinished copy was removed and the previous "
                       "checkpoint is intact: free space or lift the limit (or give another train.output_dir) and "
                       "re-run the same command")


