#!/usr/bin/env python
"""Turn one of our ViT exports into a Hugging Face transformers folder (config.json + model.safetensors).

    python tools/export_hf.py runs/mae_tiny_digits/backbone.safetensors hf/mae_tiny_digits_backbone   # ViTModel
    python tools/export_hf.py runs/finetune_digits/model.safetensors hf/finetune_digits                # ViTForImageClassification
    python tools/export_hf.py runs/mae_tiny_digits/model.safetensors hf/mae_tiny_digits                # ViTMAEForPreTraining

Then, offline: transformers.AutoModel.from_pretrained("hf/mae_tiny_digits_backbone") (or the class named in
config.json's "architectures"). See ssl_vit/weights/hf.py for what transformers' ViT can express.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="our backbone.safetensors or model.safetensors (its JSON beside it)")
    parser.add_argument("out", help="the folder to write (config.json, model.safetensors)")
    args = parser.parse_args(argv)
    from ssl_vit.weights import CheckpointError
    from ssl_vit.weights.hf import export_hf

    try:
        out = export_hf(args.export, args.out)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import json

    kind = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {out}/config.json and {out}/model.safetensors: transformers' {kind} "
          f"({kind}.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
