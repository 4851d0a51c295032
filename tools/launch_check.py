"""Every Triton launch of our MPViT as a GPU would take it, on a machine without one: the models'
eval forwards and training steps run with Triton's own launch path in place
(tools/stand_in_gpu.py: each kernel compiled for the GPU target by ptxas at its first launch,
its arguments bound and specialised as the ops pass them, the launch itself a no-op), so that a
launch a GPU would refuse (a misspelt keyword, an argument of the wrong type, a kernel that does
not compile with the specialisation it gets) fails here rather than in a GPU session. Triton's
interpreter, which the kernel tests run, checks none of that. Only the first config of an
autotuned kernel is launched, unless --every-config (the tuner's every candidate, as on a GPU;
the static report compiles every config too, for the shapes in its specs). Each case runs twice,
so that every launch also goes the way it goes once its kernel is compiled: the launches of the
pinned and tuned kernels skip Triton's argument binding there (DirectLaunch), and each is
checked against that binding (the same compiled kernel, the same arguments).

    python tools/launch_check.py [--arch 90] [--sizes tiny,xsmall] [--dtypes bf16,fp16,fp32,fp64]
                                 [--modes eval,train] [--shape 2,3,97,83] [--every-config] [--compile]

16-bit dtypes run under autocast over fp32 weights, fp64 as a double model; --compile runs each
model under torch.compile(fullgraph=True) (our ops whole in its graph, the arguments Inductor's
buffers give them; a minute or more a case on a CPU); each case prints ok or FAILED with the
error, then the kernels launched, any of the package's kernels no case launched, and those
launched directly. Exit status 1 if a case failed. The first run compiles (minutes for every
case); Triton's disk cache serves later ones.
"""
import argparse
import importlib
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: JIT functions, as on a GPU

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from stand_in_gpu import SHARED_LIMIT, stand_in_gpu  # noqa: E402  (tools/, beside this script)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT),
                   help="compute capability of the stand-in GPU (80 A100, 86 A10/RTX 30xx, 89 L4/RTX 40xx, "
                        "90 H100, 100 B200, 120 RTX 50xx)")
    p.add_argument("--sizes", default="tiny,xsmall")
    p.add_argument("--dtypes", default="bf16,fp16,fp32,fp64")
    p.add_argument("--modes", default="eval,train")
    p.add_argument("--shape", default="2,3,97,83", help="input batch,channels,height,width (channels-last)")
    p.add_argument("--compile", action="store_true",
                   help="run each model under torch.compile(fullgraph=True), as 'ours + compile' does")
    p.add_argument("--every-config", action="store_true",
                   help="an autotuned kernel compiles and launches every config it would time on a GPU")
    args = p.parse_args(argv)
    stand_in_gpu(lambda *launch: None, args.arch, args.every_config)
    launched, run = set(), JITFunction.run

    def named(self, *a, **kw):
        launched.add(self.__name__)
        return run(self, *a, **kw)

    JITFunction.run = named
    from mpvit_kernels import models
    from mpvit_kernels.triton.launch import DirectLaunch

    # norm1 -> qkv's fused backward at these shapes' few rows too (a GPU takes it from NORM_GRAD_ROWS)
    importlib.import_module("mpvit_kernels.ops.linear").NORM_GRAD_ROWS = 0
    # the BatchNorm combines' first levels over these shapes' few partials too (a GPU's past 256)
    importlib.import_module("mpvit_kernels.triton.affine_hswish").COMBINE_CHUNK = 4
    from mpvit_kernels.triton.static_compile import jit_function, kernel_modules, launched_kernels

    shape = tuple(int(n) for n in args.shape.split(","))
    failed = 0
    for size in args.sizes.split(","):
        for name in args.dtypes.split(","):
            dtype = DTYPES[name]
            for mode in args.modes.split(","):
                torch.manual_seed(0)
                model = getattr(models, f"mpvit_{size}")().train(mode == "train")
                x = torch.randn(shape)
                if dtype == torch.float64:
                    model, x = model.double(), x.double()
                model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
                forward = torch.compile(model, fullgraph=True) if args.compile else model
                autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))
                case = f"MPViT-{size} {name} {mode} {tuple(shape)} sm_{args.arch}"
                case += " compiled" if args.compile else ""
                try:
                    # twice: the second's launches find their compiled kernels (DirectLaunch's path)
                    for _ in range(2):
                        with autocast, torch.set_grad_enabled(mode == "train"):
                            y = forward(x)
                            if mode == "train":
                                y.float().sum().backward()
                    print(f"{case}: ok", flush=True)
                except Exception:  # noqa: BLE001 (each case reports its own failure)
                    failed += 1
                    print(f"{case}: FAILED\n{traceback.format_exc(limit=6)}", flush=True)
    every = {jit_function(k).__name__ for module in kernel_modules() for k in launched_kernels(module).values()}
    print("launched:", " ".join(sorted(launched)))
    print("never launched:", " ".join(sorted(every - launched)) or "-")
    print("launched directly, as Triton's binding would:", " ".join(sorted(DirectLaunch.verified)) or "-")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
