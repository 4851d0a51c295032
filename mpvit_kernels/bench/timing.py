"""Timing helpers shared by the speed report and the pytest-benchmark suite."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 20) -> dict:
    """Median and quartiles of ``fn``'s wall time in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2], "reps": reps}


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Achievable HBM bandwidth: a device-to-device copy of ``nbytes`` (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


# The pytest-benchmark suite (benchmarks/) runs on CUDA when there is one, else on the CPU.
SUITE_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    """Waits for the suite's device, so that a benchmarked step includes its kernels."""
    if SUITE_DEVICE == "cuda":
        torch.cuda.synchronize()
