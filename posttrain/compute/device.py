"""Choose device and dtype from the config and the machine (never hard-coded), and know the device's
peak matmul FLOP/s (for MFU)."""

from __future__ import annotations

import functools
import os
import random
import re
import time

import numpy as np
import torch


def choose_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device: 'cuda' was asked for but torch sees no CUDA GPU; use device: auto or cpu")
    return torch.device(name)


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 training is slow and lossy)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ peak FLOP/s
# Dense (no 2:4 sparsity) peak tensor-core FLOP/s per device, from the vendors' datasheets at boost
# clock: (16-bit: bf16/fp16 with fp32 accumulate, tf32, plain fp32). Matched in order against
# torch.cuda.get_device_name(), lower-cased: the more specific names first.
GPU_PEAKS: tuple[tuple[str, float, float, float], ...] = (
    ("gh200", 989e12, 494.5e12, 67e12),
    ("h200 nvl", 835e12, 417.5e12, 60e12),
    ("h200", 989e12, 494.5e12, 67e12),
    ("h100 nvl", 835e12, 417.5e12, 60e12),
    ("h100 pcie", 756e12, 378e12, 51e12),
    ("h100", 989e12, 494.5e12, 67e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h800", 989e12, 494.5e12, 67e12),
    ("b200", 2250e12, 1100e12, 75e12),  # HGX B200 per GPU (the 4.5 PF bf16 figure is 2:4 sparse)
    ("a100", 312e12, 156e12, 19.5e12),  # SXM and PCIe share the peak
    ("a800", 312e12, 156e12, 19.5e12),
    ("l40s", 362e12, 183e12, 91.6e12),
    ("l40", 181e12, 90.5e12, 90.5e12),
    ("l4", 121e12, 60e12, 30.3e12),
    ("a10g", 70e12, 35e12, 31.2e12),  # AWS part, no NVIDIA datasheet: commonly quoted figure
    ("a10", 125e12, 62.5e12, 31.2e12),
    ("rtx 4090", 165.2e12, 82.6e12, 82.6e12),
    ("rtx 3090", 71e12, 35.6e12, 35.6e12),
    ("a6000", 154.8e12, 77.4e12, 38.7e12),
    ("v100", 125e12, 15.7e12, 15.7e12),  # fp16 only: no bf16/tf32 tensor cores (bf16 runs at fp32 rate)
    ("t4", 65e12, 8.1e12, 8.1e12),
    ("mi300x", 1307e12, 653.7e12, 163.4e12),
    ("mi250x", 383e12, 95.7e12, 95.7e12),
    ("mi250", 362e12, 90.5e12, 90.5e12),
)


def gpu_peak(name: str, dtype: torch.dtype, *, tf32: bool | None = None) -> float | None:
    """Table peak for a device name and matmul dtype, or None if the GPU is not in the table."""
    n = name.lower()
    for key, half, tf, fp32 in GPU_PEAKS:
        if re.search(rf"(?<![0-9a-z]){re.escape(key)}(?![0-9a-z])", n):
            if dtype in (torch.bfloat16, torch.float16):
                if dtype is torch.bfloat16 and key == "v100":
                    return fp32
                return half
            if tf32 is None:
                tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
            return tf if tf32 else fp32
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@functools.cache
def measure_matmul_peak(device_type: str = "cpu", dtype: torch.dtype = torch.float32, threads: int | None = None,
                        n: int = 1024, budget_s: float = 0.5) -> float:
    """Best-of FLOP/s of square matmuls (up to n x n x n) on this device and dtype, in about
    `budget_s` seconds. A 256^3 probe first sizes the benchmark, so a dtype without fast kernels
    (fp16 on most CPUs) is measured small instead of taking seconds. Cached per process, per dtype
    and thread count (`threads` is only a cache key: pass torch.get_num_threads())."""
    device = torch.device(device_type)
    g = torch.Generator().manual_seed(0)

    def best_of(size: int, budget: float, min_reps: int) -> float:
        a = torch.randn(size, size, generator=g).to(device, dtype)
        b = torch.randn(size, size, generator=g).to(device, dtype)
        c = torch.empty(size, size, device=device, dtype=dtype)
        torch.mm(a, b, out=c)  # warm-up (thread pool, kernel selection)
        _sync(device)
        best, start, reps = float("inf"), time.perf_counter(), 0
        while reps < min_reps or (time.perf_counter() - start < budget and reps < 50):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
            reps += 1
        return 2.0 * size**3 / best

    rate = best_of(256, budget_s / 10, 2)
    # the largest power-of-two size up to n whose single matmul takes <= budget/8 at the probed rate
    size = 256
    while size * 2 <= n and 2.0 * (size * 2) ** 3 / rate <= budget_s / 8:
        size *= 2
    return max(rate, best_of(size, budget_s * 0.8, 2)) if size > 256 else rate


def peak_flops(device: torch.device | str, dtype: torch.dtype, override: float | None = None) -> float:
    """Peak matmul FLOP/s of one device: `override` (config `compute.peak_flops`) if given, else the
    GPU table by name, else a measured matmul peak (CPU, MPS, GPUs missing from the table)."""
    if override:
        return float(override)
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, dtype)
        if peak is not None:
            return peak
        return measure_matmul_peak("cuda", dtype, n=4096)
    return measure_matmul_peak(device.type, dtype, torch.get_num_threads() if device.type == "cpu" else None)


def remeasure_peak(device: torch.device | str, dtype: torch.dtype) -> float:
    """Measure the matmul peak again (the cached figure is dropped): when an achieved rate showed the
    first measurement was too low, e.g. taken while other processes held the cores."""
    device = torch.device(device)
    measure_matmul_peak.cache_clear()
    if device.type == "cuda":
        return measure_matmul_peak("cuda", dtype, n=4096)
    return measure_matmul_peak(device.type, dtype, torch.get_num_threads() if device.type == "cpu" else None)


def mfu(flops_per_s: float, peak: float, n_devices: int = 1) -> float:
    """Fraction of peak: achieved FLOP/s over `n_devices` x `peak` (per-device peak)."""
    return flops_per_s / (peak * n_devices) if peak > 0 else 0.0
