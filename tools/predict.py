#!/usr/bin/env python
"""The top-k classes a classifier export gives image files.

    python tools/predict.py runs/finetune_digits/model.safetensors photo.png other.jpg --top-k 3

`--help` describes every option (ssl_vit/cli/predict.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl_vit.cli.predict import predict  # noqa: E402

if __name__ == "__main__":
    sys.exit(predict(sys.argv[1:]))
