"""What the fork server of a multi-process run loads once, before it forks any data-loader worker
(worker_start.py says why a multi-process run starts its workers that way). Nothing else imports it.

The modules every worker needs are imported here, so each worker starts at once instead of importing
torch again. The stop signals are ignored here as in the workers (run_state.ignore_stop_signals):
`kill -TERM -PGID`, a cluster's preemption or Ctrl-C reach the whole process group, this server
included, and ask the trainer for a checkpoint; the server dying of them would take the running
workers with it and turn a clean checkpoint-and-exit into a crash.
"""
import signal

import torch  # noqa: F401  (imported for the workers: loaded once, before the forks)

from ..run_state import STOP_SIGNALS
from . import stream, transforms  # noqa: F401  (the dataset and transform classes the workers unpickle)

for _signal in STOP_SIGNALS:
    signal.signal(_signal, signal.SIG_IGN)
