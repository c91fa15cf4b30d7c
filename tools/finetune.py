#!/usr/bin/env python
"""Fine-tune a pre-trained encoder end to end (MAE appendix A.2 protocol).

    accelerate launch tools/finetune.py recipe=finetune_base init=mae_pretrain_vit_base.pth data.train=... data.val=...
    accelerate launch tools/finetune.py recipe=finetune_digits init=runs/mae_tiny_digits/backbone.safetensors

The training loop of pretrain.py with the classification task: prints top-1/top-5 on data.val every
eval.every_epochs and at the end, writes metrics.json, model.safetensors and model_best.safetensors.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl_vit.cli.commands import finetune  # noqa: E402

if __name__ == "__main__":
    sys.exit(finetune(sys.argv[1:]))
