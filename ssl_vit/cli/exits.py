"""How a command ends when it cannot go on: one line for a person's mistake, a line from the rank that
failed (not only from rank 0), no traceback wall from the launcher's side, and the exit code that says
which it was.

    a mistake (ConfigError, CheckpointError)      "error: ..." on stderr, exit 2. Before the process
                                                  group exists every rank computes the same error, so
                                                  rank 0 alone prints it; once the run is under way
                                                  the error may be one rank's (a bad shard it reads):
                                                  every rank that meets one prints it, with its rank
    another rank's failure, met in a collective   one line, "stopping: [rank N] another process of this
    (gloo: "Connection closed by peer")           run failed: see its error line ...", exit 1
    a second Ctrl-C                               one line, exit 130 (the shell's code for SIGINT)
    anything else                                 Python's traceback, exit 1 (a defect to report)

Under torchrun (`accelerate launch --multi_gpu`) the launcher prints a table of the failed ranks
after they exit (ChildFailedError); its "Root Cause" names the first failure and shows the message
of the error file the launcher gives each rank (TORCHELASTIC_ERROR_FILE). The message written there
is the same line, so the table ends with it instead of "To enable traceback see ...".
"""
from __future__ import annotations

import json
import os
import sys
import time

from ..config import CheckpointError, ConfigError

# what a collective raises when another rank of the run is gone (gloo's transport, NCCL's abort)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "Socket Timeout", "Connection refused")


def exit_on_error(fn):
    """Decorator for command-line entry points (see the module docstring)."""
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            if _rank() == 0:
                print("stopped at once (a second Ctrl-C): nothing was saved since the last checkpoint; re-run the "
                      "same command to resume from it", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        except (ConfigError, CheckpointError) as error:
            _report(f"error: {error}", after_start=_run_under_way())
            raise SystemExit(2) from None
        except RuntimeError as error:
            lost = next((text for text in PEER_LOST if text in str(error)), None)
            if not (_run_under_way() and lost):
                raise
            _report(f"stopping: [rank {_rank()}] another process of this run failed: see its error line (this one "
                    f"met the failure in a collective: {lost})", after_start=True, later=True)
            raise SystemExit(1) from None
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _run_under_way() -> bool:
    """Whether this is one rank of several with the process group formed: from then on an error may
    be this rank's alone."""
    distributed = sys.modules.get("torch.distributed")
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 and distributed is not None
            and distributed.is_available() and distributed.is_initialized())


def _report(line: str, after_start: bool, later: bool = False) -> None:
    """Print `line` (rank 0 only before the run is under way; every rank after, naming itself), and
    give it to the launcher's error file. `later`: a consequence of another rank's failure, recorded a
    second later so that the launcher's table takes the original as the root cause."""
    if after_start and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not line.startswith("stopping"):
        line = line.replace("error: ", f"error: [rank {_rank()}] ", 1)
    if after_start or _rank() == 0:
        print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and not os.path.exists(error_file):
        try:
            with open(error_file, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time()) + (1 if later else 0)}, f)
        except OSError:
            pass  # the table then says less; the line above is printed anyway
