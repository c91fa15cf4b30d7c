"""One run per output folder: a lock while it runs, the recipe a checkpoint was trained with, and
old runs set aside rather than mixed in.

    .lock                   held (lockf) by the run writing into the folder; the kernel drops it when
                            the process dies, so a crashed run never leaves it stuck
    checkpoints/*/config.yaml  what check_resume compares with the command's recipe
    previous/<time>/        what resume=false (the old run) or going back to an older checkpoint
                            (the newer ones) would otherwise have mixed into this run
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError
from .checkpoints import Checkpoints
from .outputs import file_sha256

# keys that do not change what a run computes, so that a resumed run may give other values: how far
# it goes, how often it saves, logs and evaluates, and how the same global batch is split over
# processes, devices and loader workers (the data order then differs, as with another process count)
MAY_CHANGE_ON_RESUME = ("recipe", "imports", "resume", "print_config", "like", "train.max_steps",
                        "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite_steps",
                        "train.output_dir", "train.compile", "train.grad_checkpointing", "data.num_workers",
                        "data.batch_size", "eval.", "log.")
NOT_THE_RUNS = (".lock", "previous")  # the folder's lock and the runs set aside before


def run_files(output_dir: Path) -> list[str]:
    """What a run left in its folder: everything but the lock and previous/ (the loop's files, and
    whatever a task writes there, e.g. the dVAE's tokenizer.safetensors), so that starting over sets
    all of it aside, whoever wrote it."""
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name not in NOT_THE_RUNS)


def check_resume(cfg, config_now: dict) -> Optional[Path]:
    """The checkpoint a run will resume from, having checked it was trained with this recipe: every
    key outside MAY_CHANGE_ON_RESUME equal, and the file at `init` unchanged; else a ConfigError
    naming what differs and the ways out. Reads files only: the same answer on every rank."""
    checkpoints = Checkpoints(None, Path(cfg.train.output_dir) / "checkpoints", keep=cfg.train.keep_checkpoints)
    path = checkpoints.find(str(cfg.resume))
    if path is None:
        return None
    saved_file = next((f for f in (path / "config.yaml", Path(cfg.train.output_dir) / "config.yaml") if f.is_file()),
                      None)
    way_out = (f"Start over with resume=false (the old run is then moved into {cfg.train.output_dir}/previous/), "
               "or give another train.output_dir")
    if saved_file is not None:
        import yaml

        saved = yaml.safe_load(saved_file.read_text()) or {}
        for tree in (saved, config_now):  # the same file named another way is the same init
            if tree.get("init") and tree["init"] != "random":
                tree["init"] = str(Path(tree["init"]).resolve())
        differences = changed_keys(saved, config_now)
        if differences:
            shown = "; ".join(f"{key}: {_text(old)} -> {_text(new)}" for key, old, new in differences[:8])
            more = f" (and {len(differences) - 8} more)" if len(differences) > 8 else ""
            raise ConfigError(f"{path} was trained with other settings than this command's, so resuming it would "
                              f"give neither run's result: {shown}{more}. {way_out}. Keys that may change on a "
                              f"resume: {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in MAY_CHANGE_ON_RESUME)}")
    if cfg.init and cfg.init != "random":
        started = json.loads((path / "train_state.json").read_text()).get("init_sha256")
        now = file_sha256(cfg.init)
        if started and now != started:
            raise ConfigError(f"init={cfg.init} is not the file {path} started from (its sha256 changed since): "
                              f"resuming would mix two initialisations. {way_out}")
    return path


def _text(value: Any) -> str:
    return "(absent)" if value is None else repr(value)


def changed_keys(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, value now) for every key that changes what the run computes."""
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    keys = sorted(set(flat_saved) | set(flat_now))
    return [(k, flat_saved.get(k), flat_now.get(k)) for k in keys
            if flat_saved.get(k) != flat_now.get(k) and not k.startswith(MAY_CHANGE_ON_RESUME)
            and k not in MAY_CHANGE_ON_RESUME]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def set_aside(output_dir: Path, names, why: str) -> Optional[Path]:
    """Move a run's files (or some checkpoints) into output_dir/previous/<time>/, keeping their
    layout; nothing is deleted. Returns that folder (None when there was nothing to move)."""
    import time

    present = [output_dir / name for name in names if (output_dir / name).exists()]
    if not present:
        return None
    folder = output_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    while folder.exists():
        folder = folder.with_name(folder.name + "+")
    for path in present:
        target = folder / path.relative_to(output_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    (folder / "WHY").write_text(why + "\n")
    return folder


# -------------------------------------------------------------------------------------------
# the lock


class FolderLock:
    """An exclusive, advisory lock on output_dir/.lock for the life of the run, released by the kernel
    when the process ends, however it ends. A POSIX record lock (lockf), not flock: forked DataLoader
    workers do not inherit it, so a SIGKILLed trainer's workers cannot keep it while they wind down.
    The file records who holds it."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / ".lock"
        self.handle = None

    def acquire(self) -> Optional[str]:
        """None when locked by us; else who holds it (the error's text)."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            return holder
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}, started {__import__('time').ctime()}\n")
        handle.flush()
        self.handle = handle
        return None

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the file drops the lock
            self.handle = None
