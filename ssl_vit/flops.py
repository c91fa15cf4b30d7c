"""Counting the work of a training step, and the hardware peak to compare it with (nanoGPT's MFU).

FLOPs are counted by torch's own `FlopCounterMode` (matrix multiplies and attention, forward and
backward), not estimated by formula, so they follow whatever the task really runs (e.g. MAE's
encoder on 25% of the patches).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                   "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "A6000": 155.0, "T4": 65.0}


def training_flops_per_image(step: Callable[[], torch.Tensor], batch_size: int) -> float:
    """FLOPs of one forward + backward (`step` returns the loss), divided by the batch size."""
    counter = FlopCounterMode(display=False)
    with counter:
        step().backward()
    return counter.get_total_flops() / batch_size


def gpu_peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), None)


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of large square matrix multiplies on this device and dtype: the practical ceiling a
    training step's FLOP/s is compared with on hardware without a data-sheet figure."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    _sync(device)
    return 2 * size ** 3 * runs / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
