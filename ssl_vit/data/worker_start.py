"""How a DataLoader starts its workers: fork in a one-process run, a fork server when a launcher
started several processes (WORLD_SIZE > 1).

A rank of a multi-process run has threads that enter Python on their own (the process group's). If
the rank forks while one of them holds the interpreter's thread-list lock, the child waits for that
lock for ever, inside os.fork() (CPython 3.11: PyOS_AfterFork_Child -> _PyThreadState_DeleteExcept).
The hung worker stops its rank, and every other rank then waits in its next collective, without a
message: the two-process k-NN evaluation hung so in CI. Measured here with the check in
tests/test_data.py (slow suite: 2 processes on gloo, each starting a fresh loader's 2 workers right
after a collective, 200 times): forked from the ranks, 6 runs of 10 hung; from the fork server,
none of 6.

A fork server is a process with one thread, started from a fresh interpreter, that forks the
workers instead (Python 3.14 made it the default start method on Linux for the same reason). It
imports torch and the loader's modules once (fork_server_preload.py), so a worker starts in
milliseconds. Each worker imports the main script under another name (multiprocessing's rule for
every start method but fork): a script that runs multi-process training must keep its work under
`if __name__ == "__main__":`, as Python's "spawn" start method has always required.
"""
from __future__ import annotations

import os
from typing import Optional

PRELOAD = ["ssl_vit.data.fork_server_preload"]  # torch and the loader's modules, loaded once


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
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()  # returns at once when it runs already
    return True
