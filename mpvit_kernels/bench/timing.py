"""Timing helpers shared by the speed report and the pytest-benchmark suite."""
from __future__ import annotations

import contextlib
import functools
import platform
import re
import statistics
import time
from typing import Callable

import torch

# Called with no argument after each measure(): the speed report's progress bar listens here.
after_measure: list[Callable[[], None]] = []

# Bytes written between repeats to push the previous repeat's data out of L2 (50 MiB on an H100,
# 60 on an H200): at least this, or twice the device's L2 if that is larger.
L2_FLUSH_BYTES = 256 << 20


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A folder name for the device's results: 'nvidia-h100-80gb-hbm3', 'cpu-x86_64'."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{platform.machine().lower()}"


@contextlib.contextmanager
def report_settings():
    """What a speed report runs under. Every row compiles its own functions, but Dynamo counts
    compiles per function's code, shared by every torch.compile of it (the model's forward over
    sizes, shapes and dtypes): past its default of 8, a compiled column would run eager, unseen.
    And cuDNN's fp32 convs default to TF32, which our kernels never use for fp32: off, so that
    fp32 rows compare like with like."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch._dynamo.config.patch(recompile_limit=1 << 16, accumulated_recompile_limit=1 << 16):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def _l2_flush_buffer(device_index: int) -> torch.Tensor:
    l2_bytes = getattr(torch.cuda.get_device_properties(device_index), "L2_cache_size", 0)
    return torch.empty(max(L2_FLUSH_BYTES, 2 * l2_bytes), dtype=torch.uint8, device=f"cuda:{device_index}")


def flush_l2(device: torch.device) -> None:
    """Overwrites a buffer larger than L2 and waits for it: the next kernel reads from HBM."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    _l2_flush_buffer(index).zero_()
    # waited for, so that the op's own launch latency stays in its timing as without a flush
    torch.cuda.synchronize(device)


def first_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, host work included: for a torch.compile'd function called first
    with a shape, its tracing and compiling (or a recompile, or a cache hit)."""
    sync_device(device)
    t0 = time.perf_counter()
    fn()
    sync_device(device)
    return (time.perf_counter() - t0) * 1e3


def _timed_call(fn: Callable[[], object], device: torch.device, host: list[float] | None = None) -> float:
    """One call's time in milliseconds: CUDA events around it on a GPU, the wall clock on a CPU.
    On a GPU ``host`` (if given) also receives the host's time for the call, from before the
    start event to after the end event is queued: Python, dispatch and launches. Where it comes
    close to the events' time, the host, not the GPU, sets the pace (or a full launch queue
    blocked it)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        if host is not None:
            host.append((time.perf_counter() - t0) * 1e3)
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _summary(times: list[float], flushing: bool, first: float | None, host: list[float] | None = None) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    timing = {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2], "reps": len(times),
              "l2_flushed": flushing}
    if host:
        timing["host_ms"] = statistics.median(host)
    if first is not None:
        timing["first_call_ms"] = first
    for callback in after_measure:
        callback()
    return timing


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 20,
            flush_l2_between: bool = False, time_first_call: bool = False) -> dict:
    """Median and quartiles of ``fn``'s wall time in milliseconds (CUDA events on a GPU).

    ``flush_l2_between``: on CUDA, overwrite L2 before each repeat, outside the timed region, so
    that a memory-bound op reads its inputs from HBM as inside a network, not from the cache its
    previous repeat filled (no-op on a CPU). ``time_first_call``: time the first call on its own,
    before the warm-up, as ``first_call_ms`` (the compile of a torch.compile'd ``fn``), so that
    it never lands in the repeats even with ``warmup=0``.
    """
    first = first_call_ms(fn, device) if time_first_call else None
    for _ in range(warmup):
        fn()
    flushing = flush_l2_between and device.type == "cuda"
    sync_device(device)
    times, host = [], []
    for _ in range(reps):
        if flushing:
            flush_l2(device)
        times.append(_timed_call(fn, device, host))
    return _summary(times, flushing, first, host)


def measure_in_turns(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 3, reps: int = 20,
                     time_first_call: tuple[str, ...] = ()) -> dict[str, dict]:
    """:func:`measure` of several functions that a report compares, timed in turns: one repeat
    of each, round after round, once every one has had its first call (timed apart for those
    named in ``time_first_call``) and its warm-up. On a machine whose speed drifts during a run (a
    shared CPU; its allocator's state, which the compiles change) the drift then falls on all of
    them alike instead of on whichever ran last."""
    first = {name: first_call_ms(fn, device) if name in time_first_call else None for name, fn in fns.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync_device(device)
    times = {name: [] for name in fns}
    host = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_timed_call(fn, device, host[name]))
    return {name: _summary(times[name], False, first[name], host[name]) for name in fns}


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
    sync_device(torch.device(SUITE_DEVICE))


def keep(args, rows: list[dict]) -> None:
    """Write the rows a section has measured so far (``args.save_partial``, set by
    bench/__main__.py for each section): a run cut short by a time limit, as a GPU proof's may
    be, keeps every row it measured, not only its finished sections."""
    save = getattr(args, "save_partial", None)
    if save is not None:
        save(rows)


def compiled(args, eager: Callable, ours: Callable | None = None, fullgraph: bool = True,
             cudagraphs: bool = False) -> dict[str, Callable]:
    """A row's compiled columns: "torch.compile" of the eager function, "torch.compile
    max-autotune" with --max-autotune (its compile takes minutes), and "ours + compile" (our ops
    stay whole in the graph, what is around them fuses); none with --no-compile. Compiles happen
    at the first call, which ``measure(..., time_first_call=True)`` times apart. max-autotune
    replays CUDA graphs only with ``cudagraphs`` (the whole model): a replay copies every input
    into the graph's own buffers, which for one op is a read and a write of its inputs more."""
    if args.no_compile:
        return {}
    impls = {"torch.compile": torch.compile(eager, fullgraph=fullgraph)}
    if getattr(args, "max_autotune", False):
        mode = "max-autotune" if cudagraphs else "max-autotune-no-cudagraphs"
        impls["torch.compile max-autotune"] = torch.compile(eager, fullgraph=fullgraph, mode=mode)
    if ours is not None:
        impls["ours + compile"] = torch.compile(ours, fullgraph=fullgraph)
    return impls
