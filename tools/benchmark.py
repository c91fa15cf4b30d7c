#!/usr/bin/env python
"""Speed benchmarks; each prints a table and ends with one JSON line holding every figure.

    python tools/benchmark.py data   [--num-images 300] [--workers 2] [--batch 32]
        images/s of our MAE pre-training input pipeline (shards -> uint8 batches) against
        torchvision ImageFolder + DataLoader with the same transform and worker count, on
        synthetic ImageNet-sized JPEGs; plus single-image JPEG decode times.
    python tools/benchmark.py memory [--recipe mae_giant ...] [--gpus 8 64] [--gpu-memory 80]
        per-GPU memory of recipes (parameters, gradients, AdamW state, activations), DDP vs FSDP,
        counted from the model built on the meta device (nothing is allocated or timed).
    python tools/benchmark.py mae    [--arch vit_base_patch16] [--batch 8] [--precision bf16]
        images/s of a full MAE training step on one process, its FLOPs per image (counted by
        torch.utils.flop_counter), the achieved FLOP/s as a fraction of a matrix-multiply peak
        measured in the same run and the same precision (fp32 tensors under the step's autocast),
        for several ways of executing the same step; and the same
        step with masking off (all tokens through the encoder) to show MAE's speed-up.
    python tools/benchmark.py mim    [--batch 8] [--precision bf16]
        the cost of keeping every token: a ViT-B/16 training step of MAE (the encoder sees the 25%
        visible patches), of SimMIM on our ViT-B (every patch, the masked ones as a mask token) and of
        SimMIM on BEiT's encoder (shared relative position bias, layer scale: recipe simmim_vit_base),
        each in a fresh process (the three in turn, --repeats times, the fastest kept), with FLOPs per
        image and the fraction of the measured matmul peak.
    python tools/benchmark.py checkpoint [--recipe mae_base] [--repeats 3]
        what verifying checkpoints costs: a recipe's training checkpoint (model, AdamW state, RNG,
        as Accelerate's save_state writes it) written, then the sha256 of every file taken (as
        Checkpoints.save does for the manifest) and checked (as a resume does), in seconds and GB/s.
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

    from ssl_vit import recipes
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

    cfg = recipes.load(["recipe=mae_base", f"data.train={work / 'shards' / 'bench.json'}",
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
# MAE training step

# Each variant runs in a fresh process (allocator settings and kernels chosen at start-up must not
# leak from one to the next); they differ only in how the step executes, never in its maths.
MAE_VARIANTS = {
    "eager": "what pretrain.py runs: autocast bf16, fused AdamW, SDPA's default (CPU flash) attention",
    "adamw_foreach": "torch's default AdamW implementation (foreach) instead of the fused kernel",
    "math_attention": "SDPA restricted to its math kernel (matmul + softmax) for these short sequences",
    "keep_memory": "glibc keeps freed memory (mallopt) instead of returning it, so the fp32 gradient "
                   "buffers of each step are not page-faulted in again",
    "compile": "torch.compile of the model",
}


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the system."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 34)


def mae_step_worker(args) -> dict:
    """Runs in the child process: time a full training step (forward, backward, AdamW) of the task that
    `--recipe` with the `--set` overrides builds (MAE by default)."""
    import contextlib

    variant = args.variant
    if variant == "keep_memory":
        keep_freed_memory()
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ssl_vit import recipes
    from ssl_vit.run.flops import training_flops_per_image
    from ssl_vit.tasks import Progress, build

    torch.manual_seed(0)
    device = torch.device(bench_device(args.device))
    overrides = args.set if args.set is not None else [f"model.arch={args.arch}"]
    cfg = recipes.load([f"recipe={args.recipe}", *overrides])
    model = build(cfg).to(device)
    if args.set is None:
        # set on the module, not the recipe: with nothing masked (the "no masking" row) the loss is 0 / 0,
        # which a training run refuses; here only the step's cost is measured, and it is the same
        model.mask_ratio = args.mask_ratio
    fused = variant != "adamw_foreach"
    trained = [p for p in model.parameters() if p.requires_grad]  # not a teacher's
    optimizer = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.95), fused=fused, foreach=not fused)
    size = cfg.model.img_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    if model.needs_any_image_size:  # multi-crop (DINO): 2 global views and the local ones, a list
        local = cfg.task.local_crop_size
        images = [images, torch.randn_like(images)] + [torch.randn(args.batch, 3, local, local, device=device)
                                                       for _ in range(cfg.task.local_crops_number)]
    progress = Progress(step=0, total_steps=1000, steps_per_epoch=100)  # past the frozen last layer: epoch 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.precision != "no")
    attention = sdpa_kernel(SDPBackend.MATH) if variant == "math_attention" else contextlib.nullcontext()
    forward = torch.compile(model) if variant == "compile" else model

    def loss(module=forward):
        with autocast:
            return module(images).loss

    def step():
        model.start_step(progress)   # the task's step hooks run as in pretrain.py (DINO: its EMA teacher)
        loss().backward()
        optimizer.step()
        model.after_update(progress)
        optimizer.zero_grad(set_to_none=True)

    # counted on the eager model with PyTorch's default attention: every variant is credited the same work
    flops = training_flops_per_image(lambda: loss(model), args.batch)
    optimizer.zero_grad(set_to_none=True)
    with attention:
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.steps):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    seen = {"tokens": 0}  # tokens entering the encoder's first block (the largest view's, with several)
    model.encoder.blocks[0].register_forward_hook(
        lambda module, inputs, output: seen.update(tokens=max(seen["tokens"], inputs[0].shape[1])))
    with torch.no_grad(), autocast:
        model([view[:1] for view in images] if isinstance(images, list) else images[:1])
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return {"step_s": seconds, "img_s": args.batch / seconds, "flops_per_image": flops,
            "encoder_tokens": seen["tokens"], "encoder": model.encoder.config["arch"], "max_memory_gib": memory}


def bench_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    return choice


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_mae(args) -> dict:
    import subprocess

    import torch

    from ssl_vit.run.flops import gpu_peak_flops, measured_matmul_peak, native_bf16

    device = torch.device(bench_device(args.device))
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[args.precision]
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    peak = measured_matmul_peak(device, autocast_dtype)  # as the step runs its products
    native = native_bf16(device)
    sheet = gpu_peak_flops(device) if device.type == "cuda" else None  # MFU: against the data sheet's peak
    variants = ["eager"] + [v for v in args.variants if v != "eager"]
    runs = [(name, args.mask_ratio) for name in variants] + [("eager", 0.0)]
    results = {}
    for name, mask_ratio in runs:
        key = name if mask_ratio == args.mask_ratio else f"{name}, no masking"
        command = [sys.executable, __file__, "mae-step", "--variant", name, "--arch", args.arch, "--batch",
                   str(args.batch), "--precision", args.precision, "--mask-ratio", str(mask_ratio), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--device", device.type]
        print(f"timing {key} ...", flush=True)
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[key] = json.loads(output.strip().splitlines()[-1])
    baseline = results["eager"]["img_s"]
    best = max((k for k in results if "no masking" not in k), key=lambda k: results[k]["img_s"])
    where = (f"one {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"one process on {os.cpu_count()} CPU cores")
    print(f"\nMAE training step (forward + backward + fused AdamW), {args.arch}, batch {args.batch}, "
          f"{args.precision} autocast, {where}; median of {args.steps} steps")
    how = f"fp32 tensors under {args.precision} autocast, as the step" if autocast_dtype else "fp32, as the step"
    kind = "GPU" if device.type == "cuda" else "CPU"
    print(f"matrix-multiply peak measured here (2048x2048 products of {how}): {peak / 1e9:.0f} GFLOP/s; "
          f"this {kind} {'has' if native else 'has no'} native bf16"
          + (f"; the data sheet's dense bf16 peak: {sheet / 1e12:.0f} TFLOP/s (MFU is against it)" if sheet else "")
          + "\n")
    print("| variant | s/step | images/s | GFLOP/image | GFLOP/s | of matmul peak | MFU | vs eager |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, r in results.items():
        achieved = r["flops_per_image"] * r["img_s"]
        mfu = f"{achieved / sheet:.0%}" if sheet else "n/a (no data-sheet peak)"
        print(f"| {key} | {r['step_s']:.3f} | {r['img_s']:.2f} | {r['flops_per_image'] / 1e9:.1f} | "
              f"{achieved / 1e9:.0f} | {achieved / peak:.0%} | {mfu} | {r['img_s'] / baseline:.2f}x |")
    speedup = results["eager"]["img_s"] / results["eager, no masking"]["img_s"]
    print(f"\nmasking {args.mask_ratio:.0%} of the patches makes the step {speedup:.2f}x faster")
    for name in variants:
        print(f"- {name}: {MAE_VARIANTS[name]}")
    figures = {"arch": args.arch, "batch": args.batch, "precision": args.precision, "native_bf16": native,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "peak_measured_as": how, "matmul_peak_flops": peak, "data_sheet_peak_flops": sheet,
               "best_variant": best, "masking_speedup": speedup}
    for key, r in results.items():
        slug = key.replace(", no masking", "_unmasked").replace("+", "_")
        figures.update({f"{slug}_img_s": r["img_s"], f"{slug}_step_s": r["step_s"],
                        f"{slug}_flops_per_image": r["flops_per_image"],
                        f"{slug}_fraction_of_peak": r["flops_per_image"] * r["img_s"] / peak})
        if sheet:
            figures[f"{slug}_mfu"] = r["flops_per_image"] * r["img_s"] / sheet
    return figures


# -------------------------------------------------------------------------------------------
# masked image modelling: what keeping every token costs

MIM_STEPS = {  # name: (recipe, overrides)
    "MAE, ViT-B/16 (mae_base)": ("mae_base", ["model.arch=vit_base_patch16"]),
    "SimMIM, our ViT-B/16": ("simmim_vit_base", ["model.arch=vit_base_patch16", "model.pos_embed=sincos",
                                                 "model.layer_scale_init=null"]),  # mae_base's encoder
    "SimMIM, BEiT-B/16 encoder (simmim_vit_base)": ("simmim_vit_base", []),
}


def bench_mim(args) -> dict:
    return compare_steps(args, MIM_STEPS, "ViT-B/16 training steps")


# -------------------------------------------------------------------------------------------
# self-distillation: DINO's step (a teacher forward, 2 global + 10 local views) beside MAE's

DINO_STEPS = {  # name: (recipe, overrides)
    "MAE, ViT-B/16 (mae_base)": ("mae_base", ["model.arch=vit_base_patch16"]),
    "MAE, ViT-S/16": ("mae_base", ["model.arch=vit_small_patch16"]),
    "DINO, ViT-S/16, 2 x 224 + 10 x 96 px (dino_vit_small)": ("dino_vit_small", ["task.local_crops_number=10"]),
}


def bench_dino(args) -> dict:
    return compare_steps(args, DINO_STEPS, "training steps of DINO and MAE")


def compare_steps(args, steps: dict, title: str) -> dict:
    """The steps of several recipes timed in turn (each in a child process), as a table against the first."""
    import subprocess

    import torch

    from ssl_vit.run.flops import gpu_peak_flops, measured_matmul_peak

    device = torch.device(bench_device(getattr(args, "device", "cpu")))
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[args.precision]
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    peak = measured_matmul_peak(device, autocast_dtype)
    sheet = gpu_peak_flops(device) if device.type == "cuda" else None  # MFU: against the data sheet's peak
    results = {}
    for repeat in range(args.repeats):  # the tasks in turn, so that a busy spell of the machine hits all
        for name, (recipe, overrides) in steps.items():
            command = [sys.executable, __file__, "mae-step", "--recipe", recipe, "--batch", str(args.batch),
                       "--precision", args.precision, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--device", device.type, "--set", *overrides]
            print(f"timing {name} (run {repeat + 1} of {args.repeats}) ...", flush=True)
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            run = json.loads(output.strip().splitlines()[-1])
            if name not in results or run["step_s"] < results[name]["step_s"]:
                results[name] = run  # the least disturbed run
    first = results[next(iter(steps))]
    where = (f"one {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"one process on {os.cpu_count()} CPU cores (a CPU measurement)")
    print(f"\n{title} (forward + backward + fused AdamW + the task's step hooks), batch {args.batch}, "
          f"{args.precision} autocast, {where}; median of {args.steps} steps, the fastest of {args.repeats} runs "
          f"in turn; matmul peak measured here: {peak / 1e9:.0f} GFLOP/s"
          + (f"; the data sheet's dense bf16 peak: {sheet / 1e12:.0f} TFLOP/s (MFU is against it)" if sheet else "")
          + "\n")
    print("| step | tokens into the encoder | s/step | images/s | GFLOP/image | of matmul peak | MFU | time vs first |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        achieved = r["flops_per_image"] * r["img_s"]
        mfu = f"{achieved / sheet:.0%}" if sheet else "n/a"
        print(f"| {name} | {r['encoder_tokens']} | {r['step_s']:.3f} | {r['img_s']:.2f} | "
              f"{r['flops_per_image'] / 1e9:.1f} | {achieved / peak:.0%} | {mfu} | {r['step_s'] / first['step_s']:.2f}x |")
    figures = {"batch": args.batch, "precision": args.precision, "repeats": args.repeats, "matmul_peak_flops": peak,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for name, r in results.items():
        slug = name.split(" (")[0].replace(", ", "_").replace(" ", "_").replace("/", "").lower()
        figures.update({f"{slug}_step_s": r["step_s"], f"{slug}_img_s": r["img_s"],
                        f"{slug}_flops_per_image": r["flops_per_image"], f"{slug}_encoder_tokens": r["encoder_tokens"]})
    return figures


def bench_memory(args) -> dict:
    """Memory per GPU of recipes, counted from their models (ssl_vit/run/memory.py), DDP vs FSDP."""
    from ssl_vit import recipes
    from ssl_vit.run.memory import table

    figures = {}
    for recipe in args.recipe:
        cfg = recipes.load([f"recipe={recipe}", *args.set])
        text, numbers = table(cfg, tuple(args.gpus), args.gpu_memory)
        print(text + "\n")
        figures.update({f"{recipe}_{k}": v for k, v in numbers.items()})
    return figures


def bench_checkpoint(args) -> dict:
    """Seconds to write a recipe's checkpoint, to take the sha256 of its files and to verify them."""
    import torch
    from accelerate import Accelerator

    from ssl_vit import recipes
    from ssl_vit.run.optim import build_optimizer
    from ssl_vit.run.checkpoints import Checkpoints, damaged
    from ssl_vit.run.state import TrainState
    from ssl_vit.tasks import task_class

    cfg = recipes.load([f"recipe={args.recipe}", "train.precision=no"])
    task = task_class(cfg.task.name).build(cfg)
    optimizer = build_optimizer(cfg.optim, task)
    for param in task.parameters():  # AdamW's two moments exist after a step: give it one
        param.grad = torch.zeros_like(param) if param.requires_grad else None
    optimizer.step()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(task, optimizer)
    times = {"write": [], "verify": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for repeat in range(args.repeats):
            checkpoints = Checkpoints(accelerator, Path(folder) / str(repeat), keep=1)
            started = time.perf_counter()
            checkpoints.save(TrainState(step=1))
            times["write"].append(time.perf_counter() - started)
            saved = checkpoints.complete()[-1]
            started = time.perf_counter()
            assert damaged(saved) is None
            times["verify"].append(time.perf_counter() - started)
        size = sum(f.stat().st_size for f in saved.iterdir())
        manifest = json.loads((saved / "manifest.json").read_text())
    write, verify = min(times["write"]), min(times["verify"])
    print(f"| recipe | checkpoint | files | write (with sha256) | verify (sha256 of every file) | verify GB/s |\n"
          f"| --- | --- | --- | --- | --- | --- |\n"
          f"| {args.recipe} | {size / 1e9:.2f} GB | {len(manifest)} | {write:.2f} s | {verify:.2f} s | "
          f"{size / 1e9 / verify:.2f} |")
    return {"recipe": args.recipe, "bytes": size, "write_s": write, "verify_s": verify,
            "verify_gb_s": size / 1e9 / verify}


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
    mae = commands.add_parser("mae", help="MAE training step: images/s, FLOPs, fraction of the matmul peak")
    mae.add_argument("--arch", default="vit_base_patch16")
    mae.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: a GPU if there is one")
    mae.add_argument("--batch", type=int, default=8)
    mae.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    mae.add_argument("--mask-ratio", type=float, default=0.75)
    mae.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    mae.add_argument("--warmup", type=int, default=2)
    mae.add_argument("--variants", nargs="+", default=["adamw_foreach", "math_attention", "keep_memory"],
                     choices=list(MAE_VARIANTS), help="ways of running the same step, each compared with "
                     "'eager' (what pretrain.py does, also timed without masking); 'compile' is slow to start")
    mim = commands.add_parser("mim", help="ViT-B steps of MAE, SimMIM on our ViT and on BEiT's encoder")
    mim.add_argument("--batch", type=int, default=8)
    mim.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    mim.add_argument("--steps", type=int, default=8, help="timed steps per task (default 8)")
    mim.add_argument("--warmup", type=int, default=2)
    mim.add_argument("--repeats", type=int, default=2, help="runs of each task, in turn; the fastest is kept (default 2)")
    dino = commands.add_parser("dino", help="DINO's step (ViT-S/16, 2 + 10 crops) beside MAE's: images/s, MFU")
    dino.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: a GPU if there is one")
    dino.add_argument("--batch", type=int, default=8)
    dino.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    dino.add_argument("--steps", type=int, default=8, help="timed steps per task (default 8)")
    dino.add_argument("--warmup", type=int, default=2)
    dino.add_argument("--repeats", type=int, default=1, help="runs of each task, in turn; the fastest is kept")
    memory = commands.add_parser("memory", help="memory per GPU of recipes: parameters, gradients, optimizer, "
                                 "activations; DDP vs FSDP (counted from the model, not timed)")
    memory.add_argument("--recipe", nargs="+", default=["mae_giant"], help="recipes (default mae_giant)")
    memory.add_argument("--gpus", nargs="+", type=int, default=[8, 64], help="GPU counts (default 8 64)")
    memory.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    memory.add_argument("--set", nargs="*", default=[], help="recipe overrides, e.g. model.arch=vit_gigantic_patch14")
    check = commands.add_parser("checkpoint", help="writing and verifying a recipe's checkpoint (sha256 of its files)")
    check.add_argument("--recipe", default="mae_base")
    check.add_argument("--repeats", type=int, default=3, help="checkpoints written and verified (default 3)")
    check.add_argument("--dir", default=None, help="where to write them (default: the temporary folder)")
    worker = commands.add_parser("mae-step", help=argparse.SUPPRESS)
    for name, default in (("--variant", "eager"), ("--arch", "vit_base_patch16"), ("--precision", "bf16")):
        worker.add_argument(name, default=default)
    for name, default in (("--batch", 8), ("--steps", 8), ("--warmup", 2)):
        worker.add_argument(name, type=int, default=default)
    worker.add_argument("--mask-ratio", type=float, default=0.75)
    worker.add_argument("--device", default="auto")
    worker.add_argument("--recipe", default="mae_base")
    worker.add_argument("--set", nargs="*", default=None, help="recipe overrides (default: --arch, --mask-ratio)")
    args = parser.parse_args(argv)

    if args.command == "mae-step":
        print(json.dumps(mae_step_worker(args)))
        return 0
    figures = {"data": bench_data, "mae": bench_mae, "mim": bench_mim, "dino": bench_dino, "memory": bench_memory,
               "checkpoint": bench_checkpoint}[args.command](args)
    print(json.dumps({"benchmark": args.command, **{k: round(v, 4) if isinstance(v, float) else v
                                                      for k, v in figures.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
