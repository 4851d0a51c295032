"""Host time of one eval forward of our MPViT with every kernel stubbed: the Python, dispatch and
allocation work the fused ops do around their launches, which a GPU cannot hide where the host
is the slower side (batch 1, or any batch once the host takes longer than the kernels).

Measured on a CPU, no GPU needed: TRITON_INTERPRET=1 takes the ops down their Triton path on CPU
tensors, and each Triton launch returns at once (Triton's own launch cost on a GPU, its argument
binding and the driver call, comes on top: --gpu-launch measures the first). The attention's
and depthwise's CPU twins, the GEMMs around them and the tensors' allocations still run, so a
small input keeps their share small; the figure is for comparing the code's host cost before
and after a change, on one machine, not a GPU's time.

    python tools/host_overhead.py [--size small] [--res 16] [--reps 50] [--profile 25] [--by-op] [--eager]
    python tools/host_overhead.py --train [--width 32] [--batch 2] [--eager]
    python tools/host_overhead.py --gpu-launch [--size small] [--eager]

--eager compares with the public model's eager forward (mpvit_kernels.bench.public_mpvit, NCHW,
no op of ours) at the same shape, the two timed in turns, with the GEMMs and convs of both stubbed
too (F.linear, F.conv2d, addmm: each returns an empty tensor of its output's shape and layout):
at batch 1 they read every weight from DRAM on the CPU (about two thirds of eager's forward
here: MPViT-S 36 ms, 11 with them stubbed), a GPU's work, not the host's. What is left is each
model's Python, dispatch and allocations, and the other ops (ours: the depthwise twin) computing
on maps of a few pixels. Neither figure has a GPU's launch cost (eager's aten ops, our Triton
launches, the GEMMs' cuBLAS/cuDNN set-up), which a GPU run adds to both.

--by-op adds where the forward's host time goes: each op of mpvit_kernels.ops that the model
calls, its calls a forward and inclusive time a call (wrapped in a timer for extra forwards after
the timed ones, the timer's own cost, under a microsecond a call, included), and the rest of the
forward (the modules' Python, the aten ops between the fused ones).

--train times a training step instead (train mode, forward, cross-entropy, backward; the batch
at least 2, for the batch statistics): the backward's host work too, the autograd nodes of our
ops and their backward ops. The GEMMs and convs cannot be stubbed there (autograd needs their
graph), so --width narrows every stage of both models to that many channels: the same modules,
ops and launches, little arithmetic (MPViT-S at full width spends most of a CPU step reading its
weights). --eager then times the public model's step in turns with ours, at the same width.

--gpu-launch takes each Triton launch down Triton's own launch path as on a GPU instead of
returning at once (tools/stand_in_gpu.py: the kernels compiled for sm_90 by ptxas at the first
forward, about 20 s for MPViT-S, then Triton's disk cache; a stand-in driver; the launch itself
a no-op; an autotuned kernel runs its first config that fits). In turns with forwards (or
--train steps) whose launches return at once, it then gives that path's share: per forward and
per launch (Triton 3.8's and 3.6's Python cost about the same here).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# before triton is imported: interpreted functions whose launches the tool stubs, or (--gpu-launch)
# the JIT functions a GPU launches
GPU_LAUNCH = "--gpu-launch" in sys.argv[1:]
os.environ["TRITON_INTERPRET"] = "0" if GPU_LAUNCH else "1"

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

LAUNCHES = [0]


def _stub(self, *args, **kwargs):
    LAUNCHES[0] += 1


def _empty_like_result(shape, like: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) \
        and not like.is_contiguous() else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _stub_gemms() -> None:
    """The GEMMs and convs both models run through aten (F.linear, F.conv2d, addmm) return an
    empty tensor of their output's shape, without computing it (--eager)."""
    F = torch.nn.functional

    def linear(x, weight, bias=None):
        return _empty_like_result(x.shape[:-1] + (weight.shape[0],), x)

    def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
        kh, kw = weight.shape[2:]
        H = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        W = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return _empty_like_result(x.shape[:-3] + (weight.shape[0], H, W), x)

    def addmm(base, a, b, **kwargs):
        return _empty_like_result((a.shape[0], b.shape[1]), a)

    F.linear, F.conv2d, torch.addmm = linear, conv2d, addmm
    torch.Tensor.addmm_ = lambda self, a, b, **kwargs: self


def _time_ops(totals: dict) -> None:
    """Wrap every public op of mpvit_kernels.ops (the model calls them as ``ops.<name>``) to add
    its calls and inclusive seconds to ``totals[name]``; an op called inside another counts in
    its caller's time alone."""
    from mpvit_kernels import ops

    depth = [0]

    def timed(name, fn):
        def call(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = totals.setdefault(name, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - start
                depth[0] -= 1
        return call

    for name in ops.__all__:
        setattr(ops, name, timed(name, getattr(ops, name)))


def _launch_path_share(step, reps: int) -> tuple[float, float]:
    """Median ms of ``step`` with Triton's launch path (--gpu-launch) and with launches returning
    at once (JITFunction.run, and our pinned and tuned launches, which skip it once a kernel is
    compiled: their whole launch), timed in turns."""
    from triton.runtime.jit import JITFunction

    from mpvit_kernels.triton.launch import PinnedHeuristics, TunedLaunch

    def put(runs):
        JITFunction.run, PinnedHeuristics._run, TunedLaunch._run = runs

    paths = JITFunction.run, PinnedHeuristics._run, TunedLaunch._run
    times = ([], [])
    try:
        for _ in range(reps):
            for runs, out in ((paths, times[0]), ((_stub,) * 3, times[1])):
                put(runs)
                start = time.perf_counter()
                step()
                out.append((time.perf_counter() - start) * 1e3)
    finally:
        put(paths)
    return statistics.median(times[0]), statistics.median(times[1])


def _by_op_table(totals: dict, forwards: int, forward_ms: float) -> str:
    lines = [f"host time by op, {forwards} forwards with each op timed ({forward_ms:.2f} ms a forward):",
             "| op | calls a forward | us a call | ms a forward |", "|---|---|---|---|"]
    for name, (calls, seconds) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {name} | {calls // forwards} | {seconds / calls * 1e6:.1f} | {seconds / forwards * 1e3:.2f} |")
    rest = forward_ms - sum(seconds for _, seconds in totals.values()) / forwards * 1e3
    lines.append(f"| everything else (modules, aten ops between ours) | | | {rest:.2f} |")
    return "\n".join(lines)


def _summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4)
    return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2]}


def _spread(summary: dict, what: str = "a forward") -> str:
    return (f"{summary['median_ms']:.2f} ms {what} (p25-p75 {summary['p25_ms']:.2f}-"
            f"{summary['p75_ms']:.2f})")


def _narrow(size: str, width: int) -> None:
    """Every stage of MPViT-``size`` (ours and the public model's, which share the table) ``width``
    channels wide, its layers and MLP ratio kept."""
    from mpvit_kernels.models import mpvit

    if width % mpvit.NUM_HEADS:
        raise SystemExit(f"--width must be a multiple of {mpvit.NUM_HEADS} (the heads), got {width}")
    layers, _, mlp_ratio = mpvit.CONFIGS[size]
    mpvit.CONFIGS[size] = (layers, (width,) * 4, mlp_ratio)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=("tiny", "xsmall", "small", "base"))
    p.add_argument("--batch", type=int, default=None, help="images (default 1, or 2 with --train)")
    p.add_argument("--res", type=int, default=16, help="input height and width")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one: less noise)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also print the N functions of most own time")
    p.add_argument("--by-op", action="store_true", help="also print each fused op's calls and host time a forward")
    p.add_argument("--eager", action="store_true",
                   help="also time the public model's eager forward, in turns with ours, both with GEMMs and convs stubbed")
    p.add_argument("--train", action="store_true", help="time a training step (forward, loss, backward) instead")
    p.add_argument("--width", type=int, default=None, help="every stage this many channels wide (for --train)")
    p.add_argument("--gpu-launch", action="store_true",
                   help="launch through Triton's GPU launch path (a stand-in driver), and give its share")
    args = p.parse_args(argv)
    if args.train and args.by_op:
        p.error("--by-op times the ops' forward calls: an eval forward only")
    if args.gpu_launch != GPU_LAUNCH:  # (main called with other arguments than the process's)
        p.error("--gpu-launch decides at import whether Triton interprets: give it on the command line")
    args.batch = args.batch or (2 if args.train else 1)

    interpreter.InterpretedFunction.run = _stub
    if args.gpu_launch:
        from stand_in_gpu import stand_in_gpu  # (tools/, beside this script)

        stand_in_gpu(lambda *launch: _stub(None), verify=False)
    torch.set_flush_denormal(True)  # the stubs' outputs are uninitialised memory
    if args.eager and not args.train:
        _stub_gemms()
    if args.width:
        _narrow(args.size, args.width)
    from mpvit_kernels import models

    torch.set_num_threads(args.threads)
    mode = "train" if args.train else "eval"
    model = getattr(models, f"mpvit_{args.size}")().train(args.train).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.res, args.res).contiguous(memory_format=torch.channels_last)
    runs = [(model, x, [])]
    if args.eager:
        from mpvit_kernels.bench.public_mpvit import PublicStyleMPViT

        runs.append((PublicStyleMPViT(args.size).train(args.train), x.contiguous(), []))  # as its users run it: NCHW
    labels = torch.zeros(args.batch, dtype=torch.long)

    def call(m, inp):
        if not args.train:
            return m(inp)
        torch.nn.functional.cross_entropy(m(inp), labels).backward()

    with torch.set_grad_enabled(args.train):
        for m, inp, _ in runs:
            for _ in range(3):
                call(m, inp)
        LAUNCHES[0] = 0
        call(model, x)
        launches = LAUNCHES[0]
        for _ in range(args.reps):  # in turns: this machine's drift falls on both
            for m, inp, times in runs:
                start = time.perf_counter()
                call(m, inp)
                times.append((time.perf_counter() - start) * 1e3)
        times = runs[0][2]
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(10):
                call(model, x)
            profiler.disable()
        if args.gpu_launch:
            launch_path = _launch_path_share(lambda: call(model, x), args.reps)
        if args.by_op:
            totals, forwards = {}, max(args.reps, 1)
            _time_ops(totals)
            start = time.perf_counter()
            for _ in range(forwards):
                model(x)
            by_op_ms = (time.perf_counter() - start) * 1e3 / forwards
    result = {**_summary(times), "triton_launches": launches}
    what = "a training step" if args.train else "a forward"
    launched = "through Triton's GPU launch path" if args.gpu_launch else "stubbed"
    name = f"MPViT-{args.size[0].upper()}{args.size[1:]}{f' {args.width} wide' if args.width else ''}"
    also = " (and the GEMMs and convs)" if args.eager and not args.train else ""
    print(f"{name} batch {args.batch} {args.res}x{args.res} {mode}, kernels stubbed{also}, {args.threads} thread(s): "
          f"{_spread(result, what)}, {launches} Triton launches {launched}")
    if args.gpu_launch:
        with_path, without = launch_path
        result["launch_path_ms"] = with_path - without
        print(f"Triton's launch path (stand-in sm_90 driver), in turns with launches returning at once: "
              f"{with_path:.2f} vs {without:.2f} ms {what}, {with_path - without:.2f} ms, "
              f"{(with_path - without) / max(launches, 1) * 1e3:.1f} us a launch")
    if args.eager:
        eager = _summary(runs[1][2])
        result.update({f"eager_{k}": v for k, v in eager.items()})
        stubbed = "" if args.train else ", its GEMMs and convs stubbed"
        print(f"public model, eager (NCHW{stubbed}): {_spread(eager, what)}; "
              f"ours/eager {result['median_ms'] / eager['median_ms']:.2f}")
    if args.by_op:
        result["by_op"] = {name: {"calls": calls // forwards, "us_per_call": seconds / calls * 1e6}
                           for name, (calls, seconds) in totals.items()}
        print(_by_op_table(totals, forwards, by_op_ms))
    if args.profile:
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
    return result


if __name__ == "__main__":
    main()
