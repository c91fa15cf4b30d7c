#!/usr/bin/env python
"""Pictures of what a model does: MAE reconstructions and attention maps, as one PNG.

    python tools/visualize.py reconstruct init=runs/mae_tiny_digits/model.safetensors data.name=digits out=recon.png
    python tools/visualize.py reconstruct init=mae_visualize_vit_large.pth images=cat.jpg,dog.jpg out=recon.png
    python tools/visualize.py attention init=runs/mae_tiny_digits/backbone.safetensors images=cat.jpg --rollout

`--help` lists every option (ssl_vit/visualize.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl_vit.cli.visualize import visualize  # noqa: E402

if __name__ == "__main__":
    sys.exit(visualize(sys.argv[1:]))
