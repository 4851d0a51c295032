"""The speed report: eager PyTorch vs torch.compile vs ours, side by side in one run, on the
available device (CUDA if there is one, else CPU), medians with quartiles.

    python -m mpvit_kernels.bench [--ops affine_hswish,depthwise,dwconv_bn,gli_projection,factor_attention,
                                         residual_layernorm,linear,traffic,model]
        [--batch B] [--model-batch B] [--model-sizes tiny,xsmall,small,base] [--model-modes inference,train]
        [--dtypes bf16,fp32] [--resolutions 224,512] [--reps N] [--warmup N] [--quick] [--compile | --no-compile] [--max-autotune]
        [--no-flush-l2] [--out DIR] [--json PATH]

It prints the report (markdown) and writes results.json, speed_report.md and speedup.png to
benchmarks/results/<device>/, or --out DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch

from mpvit_kernels.bench import (affine_hswish, depthwise, dwconv_bn, factor_attention, gli_projection, linear,
                                 model, residual_layernorm, timing, traffic)
from mpvit_kernels.bench.plot import draw_speedup
from mpvit_kernels.bench.results import default_folder, environment, write_report

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SECTIONS = {"affine_hswish": affine_hswish, "depthwise": depthwise, "dwconv_bn": dwconv_bn,
            "gli_projection": gli_projection, "factor_attention": factor_attention,
            "residual_layernorm": residual_layernorm, "linear": linear, "traffic": traffic, "model": model}
# The whole model is left out unless asked for (--ops model): compiling it takes minutes. The
# others run in this order, the GEMM and attention families first: a run cut short by a time
# limit (a GPU proof's) has the rows that matter most.
DEFAULT_OPS = ["gli_projection", "factor_attention", "linear", "residual_layernorm", "dwconv_bn", "depthwise",
               "affine_hswish", "traffic"]
# --quick: 8 s on an idle 2-core CPU, 45 to 107 s while other jobs held its cores (README)
QUICK_REPS, QUICK_WARMUP, QUICK_RESOLUTION = 5, 1, 224


def csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def parse_args(argv, cuda: bool) -> argparse.Namespace:
    """The options, every default filled in for this device (and for --quick)."""
    p = argparse.ArgumentParser(prog="python -m mpvit_kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=csv(str), default=DEFAULT_OPS,
                   help=f"comma list of {', '.join(SECTIONS)} (default: all but model)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="where to run (default cuda where a GPU is visible, else cpu)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16 on CUDA, 1 on CPU)")
    p.add_argument("--model-batch", type=int, default=None,
                   help="one batch size for every input of the whole-model rows (default on CUDA: 64 and 1 at "
                        "224, 16 at 512; on CPU: 8)")
    p.add_argument("--model-sizes", type=csv(str), default=None,
                   help=f"comma list of {', '.join(model.MODEL_SIZES)} for the whole-model rows (default small,base on "
                        "CUDA, tiny on CPU)")
    p.add_argument("--model-modes", type=csv(str), default=list(model.MODES),
                   help=f"comma list of {', '.join(model.MODES)} for the whole-model rows (default both)")
    p.add_argument("--dtypes", type=csv(str), default=None,
                   help="comma list (default bf16,fp32 on CUDA, fp32 on CPU; --quick: bf16 on CUDA)")
    p.add_argument("--resolutions", type=csv(int), default=None,
                   help="input sizes for the attention shapes (default 224,512 on CUDA, 224 on CPU and with --quick)")
    p.add_argument("--reps", type=int, default=None, help=f"timed repeats per row (default 20, --quick {QUICK_REPS})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed calls first (default 3, --quick {QUICK_WARMUP})")
    p.add_argument("--quick", action="store_true",
                   help=f"a minute at most on a 2-core CPU: {QUICK_REPS} repeats after {QUICK_WARMUP} warm-up call, one "
                        f"dtype, input {QUICK_RESOLUTION} only, no torch.compile unless --compile; options given win")
    compile_choice = p.add_mutually_exclusive_group()
    compile_choice.add_argument("--compile", action="store_true", help="time torch.compile even with --quick")
    compile_choice.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--max-autotune", action="store_true",
                   help='also time torch.compile(mode="max-autotune") of eager (its compiles take minutes; in the '
                        'whole-model rows with freezing, inference only)')
    p.add_argument("--no-flush-l2", action="store_true",
                   help="on CUDA, keep L2 as the previous repeat left it (by default a buffer larger than L2 is "
                        "written before each repeat, outside the timed region)")
    p.add_argument("--out", help="folder for results.json, speed_report.md and speedup.png "
                                 "(default benchmarks/results/<device>/)")
    p.add_argument("--json", help="also write the rows as JSON to this path")
    args = p.parse_args(argv)
    if args.device == "cuda" and not cuda:
        p.error("--device cuda: no CUDA GPU is visible")
    cuda = cuda and args.device != "cpu"
    args.device = "cuda" if cuda else "cpu"
    for name in args.ops:
        if name not in SECTIONS:
            p.error(f"unknown op {name!r}; choose from {', '.join(SECTIONS)}")
    for name in args.dtypes or []:
        if name not in DTYPES:
            p.error(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    for option, values, allowed in (("--model-sizes", args.model_sizes or [], model.MODEL_SIZES),
                                    ("--model-modes", args.model_modes, model.MODES)):
        for name in values:
            if name not in allowed:
                p.error(f"unknown {option[2:-1]} {name!r}; choose from {', '.join(allowed)}")
    quick = args.quick
    args.reps = args.reps if args.reps is not None else (QUICK_REPS if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if quick else 3)
    args.batch = args.batch or (16 if cuda else 1)
    args.model_sizes = args.model_sizes or list(model.SIZES["cuda" if cuda else "cpu"])
    args.dtypes = args.dtypes or (["fp32"] if not cuda else ["bf16"] if quick else ["bf16", "fp32"])
    # the traffic model costs nothing to run: it covers 224 and 512 unless told otherwise (or --quick)
    args.traffic_resolutions = args.resolutions or ([QUICK_RESOLUTION] if quick else [224, 512])
    args.resolutions = args.resolutions or ([224, 512] if cuda and not quick else [224])
    args.no_compile = args.no_compile or (quick and not args.compile)
    args.flush_l2 = cuda and not args.no_flush_l2
    return args


class Printer:
    """Prints the report and keeps it: speed_report.md is exactly what was printed. While a
    progress bar shows, lines go through it so that the bar is redrawn below them."""

    def __init__(self):
        self.lines: list[str] = []
        self.bar = None

    def __call__(self, text: str) -> None:
        self.lines.append(text + "\n")
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text)
        sys.stdout.flush()

    def markdown(self) -> str:
        return "".join(self.lines)


def progress_bar(steps: int):
    """A bar on stderr, one step per section and dtype, its text naming the section running and
    the rows it has measured; only on a terminal, and None without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, unit="section", file=sys.stderr, disable=None, dynamic_ncols=True)


def options(args) -> dict:
    keys = ("ops", "device", "batch", "model_batch", "model_sizes", "model_modes", "dtypes", "resolutions", "traffic_resolutions", "reps", "warmup", "quick", "no_compile", "max_autotune",
            "flush_l2", "out", "json")
    return {k: getattr(args, k) for k in keys}


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv, torch.cuda.is_available())
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    folder = args.out = args.out or default_folder(device)
    info = environment(device)
    info.update(argv=list(sys.argv[1:] if argv is None else argv), options=options(args))
    plot_path = os.path.join(folder, "speedup.png")
    if os.path.exists(plot_path):  # a figure of an earlier run would sit beside this run's results
        os.remove(plot_path)

    say = Printer()
    say(f"# mpvit-kernels speed report\n\ndevice: {info['device']}; torch {torch.__version__}; "
        f"python {platform.python_version()}; extension built: {info['extension_built']}; "
        f"backend: {info['backend']}; batch {args.batch}; {args.reps} repeats after {args.warmup} warm-up "
        f"call{'' if args.warmup == 1 else 's'}"
        f"{'; torch.compile left out' if args.no_compile else ''}{' (--quick)' if args.quick else ''}; "
        "TF32 off (cuDNN's and cuBLAS's fp32 in full precision, as ours)\n")
    if cuda:
        args.peak_gbs = timing.copy_bandwidth_gbs(device)
        flushed = (f"; L2 flushed before each repeat ({timing.L2_FLUSH_BYTES >> 20} MiB or more written)"
                   if args.flush_l2 else "; L2 not flushed between repeats")
        say(f"measured copy bandwidth (the roofline for the GB/s columns): {args.peak_gbs:.0f} GB/s{flushed}\n")
    else:
        args.peak_gbs = None
        say("No GPU here: CPU timings. affine_hswish, depthwise, factor_attention and residual_layernorm 'ours' are "
            "the C++ CPU twins (the attention's backward: eager formulas), dwconv_bn and gli_projection 'ours' run "
            "unfused on them, linear 'ours' is eager's LayerNorm, GEMM and GELU; the Triton kernels run only on a "
            "GPU.\n")
    info.update(copy_bandwidth_gbs=args.peak_gbs, finished=False, section_s={})

    results, errors = [], []
    bar = say.bar = progress_bar(len(args.ops) * len(args.dtypes))
    measured = 0

    def count_row():
        nonlocal measured
        measured += 1
        if bar is not None:
            bar.set_postfix_str(f"rows measured: {measured}")

    timing.after_measure.append(count_row)
    try:
        with timing.report_settings():
            for name in args.ops:
                section = SECTIONS[name]
                section_started = time.perf_counter()
                rows, latest, failed = [], [], []

                def save_partial(section_rows, name=name, done=rows, latest=latest):
                    """What a section has measured so far, written after each of its rows
                    (timing.keep): a run cut short by a time limit keeps every row it measured."""
                    latest[:] = section_rows
                    partial = results + [{"section": name, **row} for row in done + section_rows]
                    write_report(folder, info, partial, say.markdown())

                args.save_partial = save_partial
                for dtype_name in args.dtypes:
                    if bar is not None:
                        bar.set_description(f"{name} {dtype_name}")
                    latest.clear()
                    try:
                        rows += section.run(args, device, DTYPES[dtype_name], dtype_name)
                    except Exception as e:  # one family's failure must not cost the others their rows
                        traceback.print_exc()
                        rows += latest  # what it measured before it failed
                        errors.append(f"{name} {dtype_name}: {type(e).__name__}: {e}")
                        info["errors"] = errors
                        failed.append(f"**{dtype_name} stopped after {len(latest)} rows: {type(e).__name__}: {e}**\n")
                    if bar is not None:
                        bar.update(1)
                say(f"## {name}\n\n{section.table(rows) if rows else 'no rows measured'}\n")
                for line in failed:
                    say(line)
                results += [{"section": name, **row} for row in rows]
                info["section_s"][name] = round(time.perf_counter() - section_started, 1)
                write_report(folder, info, results, say.markdown())
    finally:
        timing.after_measure.remove(count_row)
        if bar is not None:
            bar.close()
        say.bar = None

    info.update(finished=True, wall_s=round(time.perf_counter() - started, 1))
    write_report(folder, info, results, say.markdown())
    title = f"mpvit-kernels speed report: {info['device']}, batch {args.batch}, {info['date']}"
    skipped = draw_speedup(results, args.peak_gbs, title, plot_path)
    if skipped:
        print(f"speedup.png skipped: {skipped}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": info["device"], "torch": torch.__version__, "rows": results}, f, indent=1)
    print(f"results in {folder}: results.json, speed_report.md{'' if skipped else ', speedup.png'} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    for error in errors:
        print(f"failed: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
