"""The speed report: eager PyTorch vs torch.compile vs ours, side by side in one run, on the
available device (CUDA if there is one, else CPU), medians with quartiles.

    python -m mpvit_kernels.bench [--ops affine_hswish,depthwise,dwconv_bn,gli_projection,factor_attention,traffic] [--batch B]
        [--dtypes bf16,fp32] [--resolutions 224,512] [--no-compile] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

import mpvit_kernels
from mpvit_kernels.bench import affine_hswish, depthwise, dwconv_bn, factor_attention, gli_projection, traffic
from mpvit_kernels.bench.timing import copy_bandwidth_gbs, device_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SECTIONS = {"affine_hswish": affine_hswish, "depthwise": depthwise, "dwconv_bn": dwconv_bn,
            "gli_projection": gli_projection, "factor_attention": factor_attention, "traffic": traffic}


def csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpvit_kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=csv(str), default=list(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16 on CUDA, 1 on CPU)")
    p.add_argument("--dtypes", type=csv(str), default=None, help="comma list (default bf16,fp32 on CUDA, fp32 on CPU)")
    p.add_argument("--resolutions", type=csv(int), default=None,
                   help="input sizes for the attention shapes (default 224,512 on CUDA, 224 on CPU)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--json", help="also write the rows as JSON to this path")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.batch = args.batch or (16 if cuda else 1)
    args.dtypes = args.dtypes or (["bf16", "fp32"] if cuda else ["fp32"])
    # the traffic model costs nothing to run: it always covers 224 and 512 unless told otherwise
    args.traffic_resolutions = args.resolutions or [224, 512]
    args.resolutions = args.resolutions or ([224, 512] if cuda else [224])
    for name in args.ops:
        if name not in SECTIONS:
            p.error(f"unknown op {name!r}; choose from {', '.join(SECTIONS)}")
    for name in args.dtypes:
        if name not in DTYPES:
            p.error(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    device = torch.device("cuda" if cuda else "cpu")
    print(f"# mpvit-kernels speed report\n\ndevice: {device_name(device)}; torch {torch.__version__}; "
          f"python {platform.python_version()}; extension built: {mpvit_kernels.extension_available()}; "
          f"backend: {mpvit_kernels.get_backend()}; batch {args.batch}\n")
    if cuda:
        args.peak_gbs = copy_bandwidth_gbs(device)
        print(f"measured copy bandwidth (the roofline for the GB/s columns): {args.peak_gbs:.0f} GB/s\n")
    else:
        args.peak_gbs = None
        print("No GPU here: CPU timings. affine_hswish and depthwise 'ours' are the C++ CPU twins, dwconv_bn "
              "and gli_projection 'ours' run unfused on them; the Triton kernels run only on a GPU, so the attention rows are eager and "
              "torch.compile alone.\n")
    results = []
    for name in args.ops:
        section = SECTIONS[name]
        rows = []
        for dtype_name in args.dtypes:
            rows += section.run(args, device, DTYPES[dtype_name], dtype_name)
        print(f"## {name}\n\n{section.table(rows)}\n", flush=True)
        results += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
