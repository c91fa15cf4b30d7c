#!/usr/bin/env python
"""Speed benchmarks; each prints a table and ends with one JSON line holding every figure.

    python tools/benchmark.py data   [--num-images 300] [--workers 2] [--batch 32]
        images/s of our MAE pre-training input pipeline (shards -> uint8 batches) against
        torchvision ImageFolder + DataLoader with the same transform and worker count, on
        synthetic ImageNet-sized JPEGs; plus single-image JPEG decode times.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# -------------------------------------------------------------------------------------------
# data


def synthetic_jpegs(root: Path, count: int, size=(500, 375), classes: int = 10) -> list[Path]:
    """ImageNet-sized JPEGs with natural-image-like statistics (smooth structure plus noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-20, 20, smooth.shape), 0, 255).astype(np.uint8)
        path = root / f"class{i % classes:02d}" / f"image{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(batches, skip: int = 2) -> float:
    """Throughput after the first `skip` batches (worker start-up excluded)."""
    start, seen = None, 0
    for i, batch in enumerate(batches):
        images = batch["images"] if isinstance(batch, dict) else batch[0]
        if i == skip:
            start, seen = time.perf_counter(), 0
        elif i > skip:
            seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def decode_times(path: Path, repeats: int = 200) -> dict[str, float]:
    """Milliseconds to decode one JPEG on one thread: PIL, PIL with draft (DCT scaling), torchvision."""
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    data = path.read_bytes()

    def pil_full():
        Image.open(io.BytesIO(data)).convert("RGB")

    def pil_draft_half():
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (image.width // 2, image.height // 2))
        image.convert("RGB")

    timings = {"decode_pil_ms": pil_full, "decode_pil_draft_half_ms": pil_draft_half}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its image decoders
            from torchvision.io import decode_jpeg
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        timings["decode_torchvision_ms"] = lambda: decode_jpeg(encoded)
    except ImportError:
        pass
    result = {}
    for name, fn in timings.items():
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        result[name] = (time.perf_counter() - start) / repeats * 1e3
    return result


def bench_data(args) -> dict:
    import torch
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset
    from torchvision.datasets import ImageFolder

    from ssl_vit import config
    from ssl_vit.data import build_train_loader
    from ssl_vit.data.writer import items_from_image_folder, write_shards

    work = Path(args.keep or tempfile.mkdtemp(prefix="ssl_vit-bench-"))
    folder = work / "imagefolder"
    if not folder.is_dir():
        print(f"writing {args.num_images} synthetic 500x375 JPEGs into {folder} ...", flush=True)
        synthetic_jpegs(folder, args.num_images)
    items, classes = items_from_image_folder(folder)
    write_shards(items, classes, work / "shards" / "bench", max_count=100, progress=False, overwrite=True)
    steps = args.batches

    cfg = config.load(["recipe=mae_base", f"data.train={work / 'shards' / 'bench.json'}",
                       f"data.num_workers={args.workers}", f"data.batch_size={args.batch}",
                       f"model.img_size={args.img_size}"])
    ours = build_train_loader(cfg, batches_per_epoch=steps)

    # the reference: MAE's main_pretrain.py transform on torchvision's ImageFolder
    transform = T.Compose([
        T.RandomResizedCrop(args.img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(cfg.data.mean, cfg.data.std)])
    image_folder = ImageFolder(str(folder), transform=transform)

    class Repeated(Dataset):  # as many samples as our epoch, drawn from the folder
        def __len__(self):
            return steps * args.batch

        def __getitem__(self, index):
            return image_folder[index % len(image_folder)]

    reference = DataLoader(Repeated(), batch_size=args.batch, shuffle=True, num_workers=args.workers,
                           drop_last=True, pin_memory=torch.cuda.is_available())
    ours_runs, reference_runs = [], []
    for repeat in range(args.repeats):  # alternate, so that both see the same machine load
        ours_runs.append(images_per_second(ours.epoch(repeat)))
        reference_runs.append(images_per_second(reference))
    figures = {
        "shards_img_s": statistics.median(ours_runs),
        "imagefolder_img_s": statistics.median(reference_runs),
    }
    figures["ratio"] = figures["shards_img_s"] / figures["imagefolder_img_s"]
    figures.update(decode_times(items[0].source if isinstance(items[0].source, Path) else Path(items[0].source)))
    figures.update(num_images=args.num_images, workers=args.workers, batch=args.batch, batches=steps,
                   img_size=args.img_size, cpu_count=os.cpu_count())

    print(f"\ninput pipeline, MAE pre-training transform (RandomResizedCrop {args.img_size}, scale 0.2-1, bicubic, "
          f"flip); {args.num_images} synthetic 500x375 JPEGs, batch {args.batch}, {args.workers} workers, "
          f"{os.cpu_count()} CPU cores; median of {args.repeats} runs of {steps} batches")
    print("| pipeline | images/s |\n| --- | --- |")
    print(f"| ours: webdataset shards -> uint8 batches (normalised on the device) | {figures['shards_img_s']:.0f} |")
    print(f"| torchvision ImageFolder + DataLoader (ToTensor + Normalize in workers) | {figures['imagefolder_img_s']:.0f} |")
    print(f"| ratio | {figures['ratio']:.2f}x |")
    print("\nJPEG decode of one 500x375 image, one thread")
    print("| decoder | ms |\n| --- | --- |")
    for key, label in (("decode_pil_ms", "PIL"), ("decode_pil_draft_half_ms", "PIL with draft() at 1/2 scale"),
                       ("decode_torchvision_ms", "torchvision.io.decode_jpeg")):
        if key in figures:
            print(f"| {label} | {figures[key]:.2f} |")
    return figures


# -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="input pipeline: shards vs ImageFolder")
    data.add_argument("--num-images", type=int, default=300, help="synthetic JPEGs to write (default 300)")
    data.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="loader workers (default 2)")
    data.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    data.add_argument("--batches", type=int, default=40, help="batches per timed run (default 40)")
    data.add_argument("--repeats", type=int, default=3, help="timed runs of each pipeline (default 3)")
    data.add_argument("--img-size", type=int, default=224)
    data.add_argument("--keep", default=None, help="folder for the images and shards (default: a temporary one)")
    args = parser.parse_args(argv)

    figures = {"data": bench_data}[args.command](args)
    print(json.dumps({"benchmark": args.command, **{k: round(v, 4) if isinstance(v, float) else v
                                                      for k, v in figures.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
