"""Speed report section: the whole model, end to end: inference (eval, no grad) and a training
step (forward, cross-entropy, backward, AdamW step), images/s and peak memory.

Eager is the public MPViT as its users run it (mpvit_kernels.bench.public_mpvit: NCHW, the public
op sequence); ours is the same model after :func:`mpvit_kernels.fuse` (the fused stages,
channels-last from the input on, the very same weights); each also under torch.compile ("ours +
compile" compiles the fused model, our ops staying whole in its graph). With --max-autotune,
inference also times torch.compile(mode="max-autotune") of eager with Inductor's freezing (the
weights folded into the graph as constants): the strongest compiler baseline for inference. A
16-bit dtype runs under autocast with fp32 weights, as mixed-precision users run it. On a CPU,
"ours" is the C++ twins plus the reference of the Triton families. Not in the default report
(torch.compile of a whole model takes minutes): ``--ops model``.

Shapes: on a GPU, MPViT-S and -B at 224 with batch 64 and batch 1, and at 512 with batch 16 (the
inputs in --resolutions); on a CPU, MPViT-T at 224, batch 8; --model-batch sets one batch for
every input; --model-sizes and --model-modes pick models and modes. Training runs at every
shape but batch 1. Peak memory is the CUDA caching allocator's peak over one more call after the
timed ones, above what was allocated before it (activations, grads, workspaces: the weights and
optimiser states of every column stay resident alike and are left out), "-" on a CPU, which has
no such counter. "host ms" (GPU only) is the host's time for one call, until its last kernel is
queued: where it comes close to "median ms", Python and launches, not the GPU, set the pace, or
the launch queue was full (a thousand launches or so queued behind slower kernels block the
host too: compare with the CUDA-graph rows; tools/host_overhead.py measures ours' share on a
CPU). On a GPU inference is also timed replayed from a CUDA graph of eager and of ours ("eager +
CUDA graph", "ours + CUDA graph", captured after warm-up, no compile): the kernels without the
host's time; a capture that fails drops its column alone. On a CPU a mode's columns are timed in
turns, one repeat each round after round (timing.measure_in_turns): its speed drifts during a
run, and in sequence the drift would fall on whichever column ran last (the compiled ones).
"""
from __future__ import annotations

import contextlib
import copy
import sys

import torch
import torch.nn.functional as F

from mpvit_kernels import fuse
from mpvit_kernels.bench.public_mpvit import PublicStyleMPViT
from mpvit_kernels.bench.timing import compiled, keep, measure, measure_in_turns

MODEL_SIZES = ("tiny", "xsmall", "small", "base")
SHORT_NAMES = {"tiny": "T", "xsmall": "XS", "small": "S", "base": "B"}
SIZES = {"cuda": ("small", "base"), "cpu": ("tiny",)}  # the default --model-sizes
# (input, batch) per device: the throughput batch, the latency batch and the dense-prediction input
SHAPES = {"cuda": ((224, 64), (224, 1), (512, 16)), "cpu": ((224, 8),)}
DEFAULT_BATCH = {"cuda": 16, "cpu": 8}  # inputs with no entry in SHAPES
MODES = ("inference", "train")
MAX_AUTOTUNE = "torch.compile max-autotune + freezing"
# Inference replayed from a CUDA graph captured after warm-up (GPU only, no compile: a capture
# takes a second): the kernels' time without the host's, for eager and ours alike.
GRAPHED = ("eager + CUDA graph", "ours + CUDA graph")
EAGER_COMPILES = ("torch.compile", MAX_AUTOTUNE)  # the compiled columns of the unfused model
# Device types whose columns are timed in turns (a CPU's speed drifts within a run); a GPU's in
# sequence, the uncompiled ones first, so that a time-limited call has them before any compile.
IN_TURNS = ("cpu",)


def models(size: str, device: torch.device):
    """(eager, ours): a public-layout model with non-trivial BatchNorm statistics, and a fused copy."""
    torch.manual_seed(0)
    public = PublicStyleMPViT(size).to(device).eval()
    with torch.no_grad():
        for m in public.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return public, fuse(copy.deepcopy(public)).to(memory_format=torch.channels_last)


def shapes(args, device: torch.device) -> list[tuple[int, int]]:
    """(input, batch) pairs of this run: the device's SHAPES at the inputs asked for, or
    --model-batch at each of them."""
    out = []
    for res in args.resolutions:
        if args.model_batch:
            out.append((res, args.model_batch))
        else:
            out += [(r, b) for r, b in SHAPES[device.type] if r == res] or [(res, DEFAULT_BATCH[device.type])]
    return out


def _autocast(device: torch.device, dtype: torch.dtype, cache: bool = True):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def _freezing(on: bool):
    """Inductor's freezing (weights as graph constants) for the compiles made inside, if ``on``."""
    if not on:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(freezing=True)


def _inference_impls(args, public, ours, device: torch.device) -> dict:
    impls = {"eager": public, "ours": ours}
    if device.type == "cuda":
        impls.update(zip(GRAPHED, (public, ours)))
    impls.update(compiled(args, public, ours, fullgraph=False, cudagraphs=True))
    if "torch.compile max-autotune" in impls:  # frozen below, at its compile (its first call)
        impls[MAX_AUTOTUNE] = impls.pop("torch.compile max-autotune")
    return impls


def _train_impls(args, size: str, device: torch.device) -> dict:
    """Each column trains its own copy (a step changes the weights) from the same start, with
    its own AdamW; max-autotune is left out of training (its compile of the backward takes too long)."""
    pairs = [("eager", "ours", False)] + ([] if args.no_compile else [("torch.compile", "ours + compile", True)])
    impls = {}
    for public_name, ours_name, compile_them in pairs:
        for name, model in zip((public_name, ours_name), models(size, device)):
            model.train()
            run = torch.compile(model) if compile_them else model
            impls[name] = (run, torch.optim.AdamW(model.parameters(), lr=1e-4))
    return impls


def peak_mib(device: torch.device, fn) -> float | None:
    """The CUDA caching allocator's peak over one more call of fn, warm (after its compile and
    warm-up), above what was allocated before it, in MiB: activations, grads and workspaces,
    what fusion changes; not the weights and optimiser state, nor the other columns' models,
    resident alike. None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _graph_replay(model, x: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """A replay of ``model``'s inference forward captured in a CUDA graph on a copy of x, after
    warm-up forwards on a side stream (Triton's tuning and the attention's layout table may not
    happen inside a capture), as torch.cuda.graph asks. Autocast without its cache of cast
    weights, which it frees when its region ends: the graph would replay reads of freed memory
    (PyTorch's CUDA-graph notes); our own caches of folds, packings and casts likewise compute
    inside a capture (backend.cached_by_version)."""
    static_x = x.clone()
    side = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    side.wait_stream(current)
    # the outer stream context puts the current stream back even where a failed capture's exit
    # raises before the graph's own stream context is left
    with torch.no_grad(), _autocast(device, dtype, cache=False), torch.cuda.stream(current):
        with torch.cuda.stream(side):
            for _ in range(3):
                model(static_x)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static_x)

    def replay():
        graph.replay()

    # the graph reads static_x and writes out at their addresses: both live as long as the replay
    # (a freed static_x goes back to the driver at the next capture, which empties the cache)
    replay.keep = (static_x, out)
    return replay


def _step(mode: str, impl: str, target, x: torch.Tensor, labels: torch.Tensor, device: torch.device,
          dtype: torch.dtype):
    """One timed call of a column: a forward without grad, or a training step (forward,
    cross-entropy, backward, AdamW step) for a (model, optimizer) pair."""
    if impl in GRAPHED:
        return _graph_replay(target, x, device, dtype)
    if mode == "inference":
        def step():
            with _freezing(impl == MAX_AUTOTUNE), torch.no_grad(), _autocast(device, dtype):
                target(x)
    else:
        def step():
            model, optimizer = target
            with _autocast(device, dtype):
                loss = F.cross_entropy(model(x), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def run(args, device: torch.device, dtype: torch.dtype, dtype_name: str) -> list[dict]:
    rows = []
    for size in args.model_sizes:
        inference = _inference_impls(args, *models(size, device), device) if "inference" in args.model_modes else {}
        for res, batch in shapes(args, device):
            x = torch.randn(batch, 3, res, res, device=device)
            labels = torch.randint(0, 1000, (batch,), device=device)
            cases = [("inference", name, model) for name, model in inference.items()]
            if batch > 1 and "train" in args.model_modes:  # batch 1 is inference's latency case
                cases += [("train", name, pair) for name, pair in _train_impls(args, size, device).items()]
            # the uncompiled columns of both modes first (whole-model compiles take minutes: a
            # time-limited GPU call has them); the table shows each mode's rows together
            cases.sort(key=lambda case: "compile" in case[1])
            steps = []
            for mode, impl, target in cases:
                try:
                    steps.append((mode, impl, _step(mode, impl, target, x, labels, device, dtype)))
                except Exception as e:  # a first capture on a GPU costs only its own column
                    if impl not in GRAPHED:
                        raise
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # a sticky CUDA error stops the report here
                    print(f"model: column {impl!r} dropped at MPViT-{SHORT_NAMES[size]} {res} batch {batch}: "
                          f"{type(e).__name__}: {e}", file=sys.stderr)
            if device.type in IN_TURNS:
                timed = []
                for mode in MODES:
                    group = [(impl, step) for m, impl, step in steps if m == mode]
                    compiles = tuple(impl for impl, _ in group if "compile" in impl)
                    times = measure_in_turns(dict(group), device, args.warmup, args.reps, compiles)
                    timed += [(mode, impl, step, times[impl]) for impl, step in group]
            else:
                timed = ((mode, impl, step, measure(step, device, warmup=args.warmup, reps=args.reps,
                                                    time_first_call="compile" in impl)) for mode, impl, step in steps)
            for mode, impl, step, t in timed:
                rows.append({"op": "MPViT", "model": SHORT_NAMES[size], "input": res, "shape": [batch, 3, res, res],
                             "dtype": dtype_name, "mode": mode, "impl": impl, **t,
                             "img/s": batch / (t["median_ms"] * 1e-3),
                             # a CUDA graph's memory is set aside at its capture: a replay's peak says nothing
                             "peak_mib": None if impl in (MAX_AUTOTUNE, *GRAPHED) else peak_mib(device, step)})
                keep(args, rows)
            del cases, steps
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | input | batch | dtype | mode | impl | median ms | p25-p75 ms | host ms | img/s | "
           "peak MiB above resident | speedup vs eager | vs fastest compile of eager | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["model"], r["input"], r["shape"][0], r["dtype"], r["mode"])  # noqa: E731
    base = {(key(r), r["impl"]): r["median_ms"] for r in rows}
    shapes_seen = {k: i for i, k in enumerate(dict.fromkeys(key(r)[:4] for r in rows))}
    impls = ("eager", "ours", *GRAPHED, *EAGER_COMPILES, "ours + compile")
    for r in sorted(rows, key=lambda r: (shapes_seen[key(r)[:4]], MODES.index(r["mode"]), impls.index(r["impl"]))):
        compiles = [base[(key(r), c)] for c in EAGER_COMPILES if (key(r), c) in base]
        vs_compile = f"{min(compiles) / r['median_ms']:.2f}x" if compiles else "-"
        first = f"{r['first_call_ms'] / 1e3:.0f}" if r.get("first_call_ms") is not None else "-"
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        host = f"{r['host_ms']:.1f}" if r.get("host_ms") is not None else "-"
        out.append(f"| MPViT-{r['model']} | {r['input']} | {r['shape'][0]} | {r['dtype']} | {r['mode']} | "
                   f"{r['impl']} | {r['median_ms']:.1f} | {r['p25_ms']:.1f}-{r['p75_ms']:.1f} | {host} | "
                   f"{r['img/s']:.1f} | {peak} | {base[(key(r), 'eager')] / r['median_ms']:.2f}x | {vs_compile} | "
                   f"{first} |")
    return "\n".join(out)
