"""The embedded data set: scikit-learn's bundled 8x8 handwritten digits (1797 real images, 10 classes).

Split deterministically (stratified, 80/20: 1437 train / 360 val) and written once as PNG shards
into a cache folder ($SSL_VIT_CACHE, default ~/.cache/ssl_vit); the transforms upsample them to
the recipe's img_size. Nothing is downloaded: the images ship inside scikit-learn.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from .writer import Item, write_shards

SPLITS = ("train", "val")
VERSION = "v1"


def cache_dir() -> Path:
    return Path(os.environ.get("SSL_VIT_CACHE", Path.home() / ".cache" / "ssl_vit"))


def digits_items() -> dict[str, list[Item]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    indices = np.arange(len(pixels))
    train, val = train_test_split(indices, test_size=0.2, stratify=digits.target, random_state=0)
    items = {}
    for split, chosen in (("train", train), ("val", val)):
        items[split] = []
        for i in sorted(chosen):
            png = io.BytesIO()
            Image.fromarray(pixels[i], mode="L").save(png, "PNG")
            items[split].append(Item(png.getvalue(), int(digits.target[i]), f"digit{i:04d}"))
    return items


def write_digits(prefix: Union[str, Path], *, overwrite: bool = False, progress: bool = False) -> dict[str, dict]:
    """PREFIX-train-000000.tar + PREFIX-train.json, and the same for val."""
    classes = [str(d) for d in range(10)]
    prefix = Path(prefix)
    return {split: write_shards(items, classes, prefix.with_name(f"{prefix.name}-{split}"), shuffle=split == "train",
                                overwrite=overwrite, progress=progress, source="sklearn.datasets.load_digits")
            for split, items in digits_items().items()}


def digits_index(split: str, root: Optional[Path] = None) -> Path:
    """The index of a digits split, writing the shards on first use. Safe when several processes
    start at once: each writes into its own temporary folder and the first rename wins."""
    if split not in SPLITS:
        raise ValueError(f"digits has splits {SPLITS}, not {split!r}")
    folder = (root or cache_dir()) / f"digits-{VERSION}"
    index = folder / f"digits-{split}.json"
    if index.is_file():
        return index
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=folder.parent))
    try:
        write_digits(tmp / "digits")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not index.is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index
