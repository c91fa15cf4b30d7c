"""Counting the work of a training step, and the hardware peak to compare it with (nanoGPT's MFU).

FLOPs are counted by torch's own `FlopCounterMode` (matrix multiplies and attention, forward and
backward), not estimated by formula, so they follow whatever the task really runs (e.g. MAE's
encoder on 25% of the patches).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s: what MFU
# (model FLOPs utilisation, PaLM's and nanoGPT's measure) divides by on a GPU.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                   "RTX 4090": 165.0, "A6000": 155.0}


def gpu_peak_flops(device: torch.device) -> Optional[float]:
    """The data sheet's dense bf16 peak of a CUDA device, FLOP/s (None for a GPU not in the table).
    An H100's figure is the SXM part's (the PCIe part's is 756)."""
    name = torch.cuda.get_device_name(device)
    peak = next((value for key, value in GPU_PEAK_TFLOPS.items() if key in name), None)
    if peak is not None and "H100" in name and "PCIe" in name:
        peak = 756.0
    return peak * 1e12 if peak is not None else None


def training_flops_per_image(step: Callable[[], torch.Tensor], batch_size: int) -> float:
    """FLOPs of one forward + backward (`step` returns the loss), divided by the batch size."""
    counter = FlopCounterMode(display=False)
    with counter:
        step().backward()
    return counter.get_total_flops() / batch_size


def measured_matmul_peak(device: torch.device, autocast_dtype: Optional[torch.dtype], size: int = 2048,
                         seconds: float = 2.0) -> float:
    """FLOP/s of large square matrix multiplies run the way a training step runs its own: fp32
    tensors under autocast to `autocast_dtype` (None: plain fp32). The practical ceiling a step's
    FLOP/s is compared with on hardware without a data-sheet figure. Measuring in the precision the
    step runs in matters: on a CPU without native bf16 (AVX2 only), a bf16 product of bf16 tensors
    is emulated many times slower than what autocast's linear layers really run, and dividing by it
    claimed 8x the peak."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        for _ in range(3):
            a @ b
        _sync(device)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            runs += 1
        _sync(device)
    return 2 * size ** 3 * runs / (time.perf_counter() - start)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: a GPU that says so, or a CPU with AVX512-BF16 or
    AMX (as torch reports them); elsewhere bf16 is emulated, far slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
