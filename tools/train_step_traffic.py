"""Launches and bytes of one MPViT training step (forward, cross-entropy, backward), eager (the
public model's op sequence) vs ours, counted on meta tensors the way the speed report's traffic
rows count (mpvit_kernels.bench.traffic: every op that moves data one launch reading its inputs
and writing its outputs; views move nothing; a training BatchNorm, aten's or ours, with its
statistics or sums pass as well). Ours: each fused op one launch, except the attention's
forward (counted from its inference kernels) and the partial sums of residual_layernorm's, fc1's
and norm1 -> qkv's backward (CountOurs), so the kernels inside the attention's training op (its
CRPE packing and its backward's three kernels and CRPE sums) are not seen. A model, not a
timing: where the step's bytes go, and what a change takes off them.

    python tools/train_step_traffic.py [--size small] [--batch 16] [--res 224] [--dtype bf16] [--top 15]
                                       [--drop-path 0.1]

--drop-path R: stochastic depth in both models, the blocks' rates rising from 0 to R as the
models' drop_path_rate sets them (MPViT's training recipes use 0.05-0.3).
"""
import argparse
import collections

import torch

from mpvit_kernels.bench.traffic import CountOurs, CountTraffic, training_model


def by_op(base):
    class ByOp(base):
        """``base``'s count, and each op's share of it."""

        def __init__(self):
            super().__init__()
            self.op_bytes, self.op_launches = collections.Counter(), collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = self.bytes, self.launches
            out = super().__torch_dispatch__(func, types, args, kwargs)
            name = str(func.overloadpacket)
            self.op_bytes[name] += self.bytes - before[0]
            self.op_launches[name] += self.launches - before[1]
            return out
    return ByOp()


def set_drop_path(model: torch.nn.Module, rate: float) -> None:
    """The blocks' drop path rates (ours: MHCABlock.drop_path_rate; the public model's DropPath
    modules: drop_prob) rising linearly from 0 to ``rate``, block after block."""
    blocks = [m for m in model.modules() if hasattr(m, "drop_path_rate") or hasattr(m, "drop_prob")]
    for block, r in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist()):
        setattr(block, "drop_path_rate" if hasattr(block, "drop_path_rate") else "drop_prob", r)


def count(impl: str, size: str, batch: int, res: int, dtype: torch.dtype, drop_path: float = 0.0):
    model, x = training_model(impl, size, batch, res, dtype)
    set_drop_path(model, drop_path)
    counter = by_op(CountTraffic if impl == "eager" else CountOurs)
    with counter:
        loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long, device="meta"))
        loss.backward()
    return counter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=["tiny", "xsmall", "small", "base"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--top", type=int, default=15, help="ops listed per column, by bytes")
    p.add_argument("--drop-path", type=float, default=0.0, help="the last block's drop path rate")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    for impl in ("eager", "ours"):
        c = count(impl, args.size, args.batch, args.res, dtype, args.drop_path)
        print(f"{impl}: {c.launches} launches, {c.bytes / 1e6:.1f} MB")
        for name, nbytes in c.op_bytes.most_common(args.top):
            print(f"  {name:48s} {c.op_launches[name]:5d} launches {nbytes / 1e6:9.1f} MB")


if __name__ == "__main__":
    main()
