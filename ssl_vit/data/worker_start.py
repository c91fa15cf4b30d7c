"""How a DataLoader's workers start and end.

Start: fork in a one-process run, a fork server when a launcher started several processes
(WORLD_SIZE > 1). A rank of a multi-process run has threads that enter Python on their own (the
process group's). If the rank forks while one of them holds the interpreter's thread-list lock, the
child waits for that lock for ever, inside os.fork() (CPython 3.11: PyOS_AfterFork_Child ->
_PyThreadState_DeleteExcept). The hung worker stops its rank, and every other rank then waits in its
next collective, without a message: the two-process k-NN evaluation hung so in CI. Measured here with
the check in tests/test_data.py (slow suite: 2 processes on gloo, each starting a fresh loader's 2
workers right after a collective, 200 times): forked from the ranks, 6 runs of 10 hung; from the fork
server, none of 6.

A fork server is a process with one thread, started from a fresh interpreter, that forks the
workers instead (Python 3.14 made it the default start method on Linux for the same reason). It
imports torch and the loader's modules once (fork_server_preload.py), so a worker starts in
milliseconds. Each worker imports the main script under another name (multiprocessing's rule for
every start method but fork): a script that runs multi-process training must keep its work under
`if __name__ == "__main__":`, as Python's "spawn" start method has always required.

A worker ignores the stop signals (SIGTERM, SIGUSR1, SIGINT): `timeout`, `kill -TERM -PGID`, Ctrl-C
and the launchers send them to whole process groups or trees, and they ask the trainer for a
checkpoint; a worker that died of them first took the run down with it. A process that ignores SIGTERM
must be ended some other way, or it outlives the run: multiprocessing's exit handler SIGTERMs daemonic
children and then joins them without a limit, so a trainer that stopped on an error while its workers
were alive waited for ever (issue 20: "hangs at exit"). So, wherever a run ends:
    - the loaders end their workers when their iteration ends, however it ends (`end_workers`,
      called from data/loaders.py's `checked`), SIGKILLing any that did not leave when asked;
    - at interpreter exit, before multiprocessing's handler, any worker still alive is SIGKILLed
      (`_kill_leftover_workers`: a loader iterator that an exception's traceback kept alive);
    - a worker dies with its parent (PR_SET_PDEATHSIG = SIGKILL): a trainer killed outright
      (SIGKILL, the launcher's grace window over, out of memory) leaves no worker behind.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401  (its exit handler is registered first, so ours runs before it)
import os
import signal
from typing import Optional

PRELOAD = ["ssl_vit.data.fork_server_preload"]  # torch and the loader's modules, loaded once
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # what asks a run for a checkpoint
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_start_method() -> Optional[str]:
    """DataLoader's multiprocessing_context: None (fork, no start-up cost) in a one-process run,
    "forkserver" under a launcher with several processes (the server is started if it is not yet)."""
    return "forkserver" if start_worker_server() else None


def start_worker_server() -> bool:
    """Start the fork server of a multi-process run (once), and say whether there is one (none in a
    one-process run). The commands call it before they build the model, so that the server imports
    torch meanwhile."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from multiprocessing import forkserver

    multiprocessing.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()  # returns at once when it runs already
    return True


def ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def start_worker(worker_id: int = 0) -> None:
    """A DataLoader worker's first act (its worker_init_fn): leave the stop signals to the trainer,
    and die with the process that forked it (the trainer, or the fork server, which exits when the
    trainer does)."""
    ignore_stop_signals()
    die_with_parent(signal.SIGKILL)


def die_with_parent(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig): Linux sends `sig` to this process when the thread that forked it
    ends. Returns False where that is not available (not Linux) or the parent is gone already."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return False
    return os.getppid() != 1  # reparented to init before the call: nobody will send it


def end_workers(iterator, grace: float = 5.0) -> None:
    """End a DataLoader iterator's workers now: torch's own shutdown (a None on each index queue, then
    a join), then SIGKILL for any still alive (they ignore the SIGTERM torch would send them). The
    attributes are torch's (`_shutdown_workers`, `_workers`, stable since torch 1.x); an iterator
    without workers has neither."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(iterator, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(grace)


def _kill_leftover_workers() -> None:
    """At interpreter exit: SIGKILL the daemonic children still alive (loader workers whose iterator an
    exception kept alive), so that multiprocessing's own exit handler, which only SIGTERMs and then
    joins without a limit, finds them gone."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:
        child.kill()
    for child in children:
        child.join(5.0)


atexit.register(_kill_leftover_workers)  # after multiprocessing.util's: atexit runs handlers last-in first-out
