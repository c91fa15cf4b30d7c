#!/usr/bin/env python
"""Linear probing of a frozen encoder (MAE appendix A.3 protocol), with a learning-rate sweep.

    accelerate launch tools/linear_probe.py recipe=linprobe_base init=runs/mae_base/backbone.safetensors data.train=... data.val=...
    accelerate launch tools/linear_probe.py recipe=linprobe_digits init=runs/mae_tiny_digits/backbone.safetensors

Prints top-1/top-5 on data.val for the best head of the sweep and writes metrics.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl_vit.cli.commands import linear_probe  # noqa: E402

if __name__ == "__main__":
    sys.exit(linear_probe(sys.argv[1:]))
