#!/usr/bin/env python
"""k-NN evaluation of an encoder's features (DINO protocol: k=20, T=0.07, cosine similarity).

    python tools/knn.py init=runs/mae_tiny_digits/backbone.safetensors data.name=digits
    accelerate launch tools/knn.py init=mae_pretrain_vit_base.pth data.train=... data.val=...

Prints top-1/top-5 on data.val with data.train as the memory and writes metrics.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl_vit.cli.commands import knn  # noqa: E402

if __name__ == "__main__":
    sys.exit(knn(sys.argv[1:]))
