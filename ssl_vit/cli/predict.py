"""`python tools/predict.py MODEL IMAGE [IMAGE ...] [--top-k 5] [--json]`: the classes a classifier export
gives image files.

    MODEL   a classifier's model.safetensors (fine-tuning, supervised training, distillation, a linear
            probe's folded head): its JSON says how to rebuild it, its input size and normalisation,
            and its class names (from the training shards' index)
    IMAGE   image files; each is resized to img_size / crop_pct and centre-cropped (the evaluation
            transform the model was measured with)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import struct

import torch
from PIL import Image, UnidentifiedImageError

from ..config import CheckpointError, ConfigError
from ..data.transforms import build_transform
from ..models import create_encoder
from ..weights import export_description, load_weights
from .arguments import positive_int


def predict(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a classifier export: model.safetensors (its JSON beside it)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--top-k", type=positive_int, default=5,
                        help="classes shown per image (default 5; all of them if the model has fewer)")
    parser.add_argument("--json", action="store_true", help="one JSON line per image instead of text")
    args = parser.parse_args(argv)
    try:
        results = classify_files(args.model, args.images, args.top_k)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, top in results:
        if args.json:
            print(json.dumps({"image": path, "top": [{"class": c, "probability": p} for c, p in top]}))
        else:
            print(f"{path}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in top))
    return 0


def classify_files(model_path: str, images: Sequence[str], top_k: int = 5) -> list[tuple[str, list[tuple[str, float]]]]:
    """[(image, [(class, probability), ...])] of a classifier export on image files."""
    if top_k < 1:  # the command line's parser says so already; this is for callers from Python
        raise ConfigError(f"top_k must be >= 1 (the classes given per image), got {top_k}")
    path = Path(model_path)
    description = export_description(path) if path.is_file() else {}
    encoder = description.get("encoder") or {}
    if not encoder:
        raise ConfigError(f"{model_path}: not one of our exports with its JSON beside it (model.safetensors + model.json)")
    if encoder.get("num_classes", 0) <= 0:
        raise ConfigError(f"{model_path} is an encoder without a classifier (num_classes=0): give a model.safetensors "
                          "of fine-tuning, supervised training or a linear probe")
    if description.get("kind") != "model":
        raise ConfigError(f"{model_path} is a {description.get('kind')} export, not a classifier (model.safetensors)")
    model = create_encoder(**encoder).eval()
    load_weights(model, path, strict=True, verbose=False)
    classes = description.get("classes") or [str(i) for i in range(encoder["num_classes"])]
    data = description.get("data") or {}
    size = encoder.get("img_size") or [224, 224]
    size = [size, size] if isinstance(size, int) else list(size)
    transform = build_transform(SimpleNamespace(crop_pct=data.get("crop_pct", 0.875)), size, training=False)
    mean = torch.tensor(data.get("mean", [0.485, 0.456, 0.406])).view(1, -1, 1, 1)
    std = torch.tensor(data.get("std", [0.229, 0.224, 0.225])).view(1, -1, 1, 1)
    results = []
    for image in images:
        pixels = _read_image(image, transform).unsqueeze(0).float() / 255.0
        with torch.no_grad():
            probabilities = model((pixels - mean) / std).softmax(dim=-1)[0]
        top = probabilities.topk(min(top_k, len(classes)))
        results.append((image, [(classes[i], float(p)) for p, i in zip(top.values, top.indices)]))
    return results


def _read_image(image: str, transform):
    """The transform's uint8 [3, H, W] of an image file; a ConfigError, naming the file, for one that
    cannot be read."""
    file = Path(image)
    if not file.is_file():
        raise ConfigError(f"{image}: no such file")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {image}: {e.strerror}") from None
    try:
        return transform(data)
    except Image.DecompressionBombError as e:
        # Pillow refuses, before decoding, an image whose pixels could fill the memory; its message
        # holds the image's size and the limit (2 x Image.MAX_IMAGE_PIXELS)
        raise ConfigError(f"{image} is too large to open: {e} Downscale it first (the model sees it resized to "
                          "its input size anyway), e.g. with ImageMagick: convert IMAGE -resize 4096x4096 SMALL.png"
                          ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:  # what Pillow raises on a broken file
        # (an UnidentifiedImageError's own text names an in-memory buffer, not the file)
        why = "no image format it knows" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise ConfigError(f"{image} is not an image that PIL can read ({why}); "
                          "give image files (JPEG, PNG, WebP, ...)") from None
