"""Test-only: Triton's interpreter computing as a GPU does where their answers differ. bf16 computed
as a GPU computes it, so that CI runs the kernels' bf16 paths (the speed goals' dtype) on CPU
tensors; fp32 dots at TF32 refused; float arguments passed as a GPU's launch passes them.

The interpreter holds a bf16 block as its raw bits in numpy uint16. Three things then go wrong
where a GPU's answer is well defined:

- ``tl.dot`` of bf16 blocks multiplies the bits as integers. On a GPU the tensor cores multiply
  the bf16 values exactly and accumulate in fp32; here the operands are widened to fp32 (exact)
  first, which is the same sum of the same products, in another order.
- ``x.to(tl.bfloat16)`` from fp32 truncates; a GPU rounds to nearest even, as here (torch's cast),
  unless the kernel asks for rounding toward zero. From fp64 the interpreter cast the value to an
  integer; here it rounds to nearest even too.
- Any other arithmetic on bf16 (add, compare, exp, sum, ...) computes on the bits. The kernels
  widen every bf16 load to fp32 before arithmetic, so none should reach it: here it raises
  TypeError rather than returning garbage, so a kernel that does is caught by its bf16 test.

fp16 needs none of this: numpy computes float16 natively (rounding to nearest even).

One fp32 hazard is caught here too: a ``tl.dot`` of two fp32 blocks at input_precision "tf32",
Triton's default, which the interpreter computes in full fp32 but a GPU's tensor cores with
operands cut to TF32's 10 mantissa bits (about 1e-3 relative error, which fails the fp32 tests
on a GPU alone). It raises (Tf32Dot): the kernels ask for "ieee" or "tf32x3" there. And a Python
float passed to a kernel parameter without a type annotation reaches the kernel as a GPU's launch
passes it, rounded to fp32, where the interpreter kept all 64 bits: an fp64 kernel whose scale or
eps is not annotated ``tl.float64`` then fails its fp64 tests here too.
Installed by conftest when the kernels run interpreted; ``install`` returns False (and the
tests that need it skip, saying so) where the interpreter's internals are not the ones wrapped.
"""
import inspect

import numpy as np
import torch


class Bf16Arithmetic(TypeError):
    pass


class Tf32Dot(TypeError):
    pass


installed = False


def install() -> bool:
    global installed
    if installed:
        return True
    try:
        import triton
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    reduce_ops = getattr(interpreter, "ReduceOps", None)
    grid = getattr(interpreter, "GridExecutor", None)
    kernel_param = getattr(triton.runtime.jit, "KernelParam", None)
    names = ("create_dot", "cast_impl", "create_fp_to_fp", "binary_op", "unary_op", "create_fma", "create_clampf",
             "create_erf", "create_rsqrt")
    if handle is None or reduce_ops is None or grid is None or kernel_param is None or any(
            not hasattr(builder, n) for n in names) or any(
            not hasattr(reduce_ops, n) for n in ("sum", "min_max", "generic_reduce")):
        return False
    bf16 = tl.bfloat16

    def is_bf16(h):  # by name, half the time of dtype.__eq__ (half a million calls in a 6-s test)
        if type(h) is handle:  # (millions of calls: the common case first)
            return h.dtype.scalar.name == "bf16"
        return getattr(getattr(getattr(h, "dtype", None), "scalar", None), "name", None) == "bf16"

    def widen(h):  # bf16 bits -> fp32 values, exact
        bits = np.ascontiguousarray(h.data).view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16).float().numpy()

    def narrow(data):  # fp32/fp64 values -> bf16 bits, rounded to nearest even
        return torch.from_numpy(np.ascontiguousarray(data)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    dot = builder.create_dot
    tf32 = getattr(getattr(getattr(interpreter, "_ir", None), "INPUT_PRECISION", None), "TF32", None)

    def create_dot(self, a, b, d, *rest):
        if rest and tf32 is not None and rest[0] == tf32 and a.dtype.scalar == tl.float32 and \
                b.dtype.scalar == tl.float32:
            raise Tf32Dot("tl.dot of two fp32 blocks at input_precision 'tf32' (Triton's default): a GPU cuts "
                          "the operands to 10 mantissa bits; ask for 'ieee' (or 'tf32x3')")
        if is_bf16(d):
            raise Bf16Arithmetic("tl.dot accumulating in bf16: accumulate in fp32")
        if is_bf16(a):
            a = handle(widen(a), tl.float32)
        if is_bf16(b):
            b = handle(widen(b), tl.float32)
        return dot(self, a, b, d, *rest)

    rtz = getattr(getattr(getattr(interpreter, "_ir", None), "ROUNDING_MODE", None), "RTZ", None)

    def cast(original):
        def wrapped(self, src, dst_type, *rest):
            src_t, dst_t = src.dtype.scalar, dst_type.scalar
            if dst_t == bf16 and src_t == tl.float32 and rest and rtz is not None and rest[0] == rtz:
                return original(self, src, dst_type, *rest)  # asked to truncate, as the interpreter does
            if dst_t == bf16 and src_t in (tl.float32, tl.float64):
                return handle(narrow(src.data), bf16)
            if src_t == bf16 and dst_t in (tl.float32, tl.float64):
                data = widen(src)
                return handle(data if dst_t == tl.float32 else data.astype(np.float64), dst_t)
            if bf16 in (src_t, dst_t) and src_t != dst_t:
                raise Bf16Arithmetic(f"a cast between {src_t} and {dst_t}")
            return original(self, src, dst_type, *rest)
        return wrapped

    def refuse(original, what):
        def wrapped(self, *args, **kwargs):
            for a in args:  # (a loop, not any() of a generator: millions of calls)
                if is_bf16(a):
                    raise Bf16Arithmetic(f"{what} on a bf16 block: widen it to fp32 first "
                                         "(Triton's interpreter would compute on its uint16 bits)")
            return original(self, *args, **kwargs)
        return wrapped

    def refuse_reduce(original):
        def wrapped(self, input, *args, **kwargs):
            blocks = input if isinstance(input, (tuple, list)) else (input,)
            if any(is_bf16(getattr(t, "handle", None)) for t in blocks):
                raise Bf16Arithmetic("a reduction of a bf16 block: widen it to fp32 first")
            return original(self, input, *args, **kwargs)
        return wrapped

    launch = grid.__call__
    fp32_params = {}  # kernel function -> the names of its parameters that take a float as fp32

    def floats_as_fp32(fn):
        names = fp32_params.get(fn)
        if names is None:
            params = [kernel_param(i, p, False, False) for i, p in enumerate(inspect.signature(fn).parameters.values())]
            names = fp32_params[fn] = frozenset(p.name for p in params if not p.is_constexpr and not p.annotation_type)
        return names

    def gpu_float_launch(self, *args, **kwargs):
        # (the parameters looked up only for a launch that passes a float: most pass none)
        if any(isinstance(a, float) for a in args) or any(isinstance(a, float) for a in kwargs.values()):
            names = floats_as_fp32(self.fn)
            args = tuple(float(np.float32(a)) if isinstance(a, float) and name in names else a
                         for name, a in zip(self.arg_names, args)) + tuple(args[len(self.arg_names):])
            kwargs = {k: float(np.float32(a)) if isinstance(a, float) and k in names else a for k, a in kwargs.items()}
        return launch(self, *args, **kwargs)

    grid.__call__ = gpu_float_launch
    builder.create_dot = create_dot
    builder.cast_impl = cast(builder.cast_impl)
    builder.create_fp_to_fp = cast(builder.create_fp_to_fp)
    for name in ("binary_op", "unary_op", "create_fma", "create_clampf", "create_erf", "create_rsqrt"):
        setattr(builder, name, refuse(getattr(builder, name), name))
    for name in ("sum", "min_max", "generic_reduce"):
        setattr(reduce_ops, name, refuse_reduce(getattr(reduce_ops, name)))
    installed = True
    return True
