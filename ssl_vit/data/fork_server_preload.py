"""What the fork server of a multi-process run loads once, before it forks any data-loader worker
(worker_start.py says why a multi-process run starts its workers that way). Nothing else imports it.

The modules every worker needs are imported here, so each worker starts at once instead of importing
torch again. The stop signals are ignored here as in the workers (worker_start.start_worker):
`kill -TERM -PGID`, a cluster's preemption or Ctrl-C reach the whole process group, this server
included, and ask the trainer for a checkpoint; the server dying of them would take the running
workers with it and turn a clean checkpoint-and-exit into a crash. The server itself exits when the
trainer does (multiprocessing's forkserver reads EOF on its pipe), and its workers die with it.
"""
import torch  # noqa: F401  (imported for the workers: loaded once, before the forks)

from . import stream, transforms  # noqa: F401  (the dataset and transform classes the workers unpickle)
from .worker_start import ignore_stop_signals

ignore_stop_signals()
