"""How a run is asked to stop, and how the ranks agree on it.

SIGTERM, SIGUSR1 or SIGINT (Ctrl-C; a second one stops at once) to the training processes, the
launcher dying (Linux tells a launched rank), or a STOP file; each ends in a checkpoint of the last
complete step and exit code 0 (run/loop.py). Loader workers ignore these signals: the trainer decides
(data/worker_start.py). Why a stop is taken inside a step, and how several processes agree: Preemption.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from ..data.worker_start import STOP_SIGNALS, die_with_parent


class StopRequested(Exception):
    """A stop was asked for (and, with several processes, agreed on by every rank) while a step or an
    evaluation was in progress: it is abandoned, and the run checkpoints its last complete step."""


_ASKED_EARLY = []  # stop signals that came before the trainer existed (while it imported and built)


def catch_stop_signals_early() -> None:
    """From a command's first line: a stop signal during start-up (imports, data checks, building the
    model) is remembered and honoured before the first step, instead of killing the process."""
    def remember(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in _ASKED_EARLY:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        _ASKED_EARLY.append(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, remember)


class Preemption:
    """Ways to ask a run for a checkpoint and a clean exit (code 0): SIGTERM, SIGUSR1 or SIGINT to the
    training processes (cluster preemption, `timeout`, Ctrl-C: a second Ctrl-C stops at once), the
    launcher dying (a launched rank asks Linux for SIGTERM then), or a file named STOP in the output
    folder (what tools/slurm_pretrain.sh creates when SLURM warns the job; it works whatever the
    launchers in between do with signals). The file is removed when the checkpoint is written.

    The launchers give a stopped run little time before they SIGKILL it: `accelerate launch` with one
    process 5 s, torchrun (`accelerate launch --multi_gpu`) 30 s. So a stop is honoured at once, not at
    the end of a step that may take longer than that:
      - one process: a signal during the step's data fetch, forward or backward raises StopRequested
        where the step is (Python runs the handler between two operations; a backward pass, one C++
        call, finishes first); during the update, the stop waits for its end (milliseconds);
      - several processes: the ranks agree (an all-reduce of one number on a CPU-side gloo group, no
        device synchronisation) before every micro-batch and every evaluation batch, and all abandon
        the step together: a rank cannot leave a step alone, the others would wait in its collectives.
    """

    def __init__(self, stop_file: Path, watch_file: bool, launched: bool = False, group=None):
        """`group`: the gloo process group of a multi-process run (None with one process)."""
        self.requested, self.stop_file, self.watch_file = bool(_ASKED_EARLY), stop_file, watch_file
        self.group, self.abandonable = group, False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        if launched:
            _term_when_parent_dies()

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.requested = True
        if self.abandonable:
            self.abandonable = False
            raise StopRequested(signal.Signals(signum).name)

    @contextmanager
    def step_in_progress(self):
        """The part of a step a stop may abandon (one process only: see the class)."""
        self.abandonable = self.group is None
        try:
            yield
        finally:
            self.abandonable = False

    def asked(self) -> bool:
        """Whether this process was asked to stop."""
        return self.requested or (self.watch_file and self.stop_file.exists())

    def agreed(self) -> bool:
        """Whether any rank was asked to stop: the same answer on every rank (a collective)."""
        return self._reduce([self.asked()])[0] > 0

    def check(self) -> None:
        """Raise StopRequested if a stop was asked for (on any rank): call it at the same points on
        every rank, as any collective."""
        if self.agreed():
            raise StopRequested("asked")

    def rounds(self, items: Iterable) -> Iterator:
        """`items` (an evaluation's batches), checking for a stop before each one. With several
        processes the ranks may hold different numbers of batches (an evaluation reads each sample
        once, without padding): a rank out of batches keeps taking part in the rounds until every rank
        is, so that all of them agree on a stop at the same round."""
        iterator, more = iter(items), True
        try:
            while True:
                item = next(iterator, _END) if more else _END
                more = item is not _END
                stop, anyone_more = self._reduce([self.asked(), more])
                if stop > 0:
                    raise StopRequested("asked")
                if not anyone_more:
                    return
                if more:
                    yield item
        finally:
            if hasattr(iterator, "close"):  # a loader's generator: its workers end now (data/loaders.py)
                iterator.close()

    def _reduce(self, flags: list) -> list[float]:
        if self.group is None:
            return [float(f) for f in flags]
        values = torch.tensor([float(f) for f in flags])  # on the CPU: no device synchronisation
        dist.all_reduce(values, group=self.group)
        return values.tolist()

    def clear(self) -> None:
        """Remove the STOP file (once honoured, or left by a run that died before honouring it)."""
        if self.watch_file:
            self.stop_file.unlink(missing_ok=True)


_END = object()


def _term_when_parent_dies() -> None:
    """A launched rank asks Linux for SIGTERM when its launcher exits (a stop request like any other).
    Only for processes a launcher started: a run under nohup must outlive its shell."""
    if not die_with_parent(signal.SIGTERM):  # the launcher died before the call: nobody would send it
        os.kill(os.getpid(), signal.SIGTERM)
