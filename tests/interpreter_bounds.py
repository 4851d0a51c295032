"""Test-only: every memory access of an interpreted Triton launch checked against the tensors the
launch was given, as compute-sanitizer's memcheck checks a GPU's (and AddressSanitizer the CUDA
kernels' host runs, tests/cuda_host).

The interpreter reads and writes whatever address a lane computes: a lane that a kernel forgot to
mask reads a neighbour's bytes, or writes over them, and the test may still pass (the value is
masked out later, or lands in memory nobody checks). On a GPU the same lane reads another tensor
of the caching allocator's block, corrupts it, or faults. Here each load, store and atomic checks
the addresses of its active lanes (the mask's True ones, all of a scalar access): each element
must lie within the extent of one tensor argument of the launch, from its first element to one
past its last (its storage offset and strides; a tensor descriptor's base is such an argument,
its loads are masked to its shape first). Another part of the same storage is out of bounds too:
a kernel given a view reads that view. The first access outside raises OutOfBounds naming the
kernel, the access, and where the address lies against the nearest argument.

Installed by conftest when the kernels run interpreted (every test's launches are checked; the
cost is a few numpy calls per access). ``install`` returns False where the interpreter's
internals are not the ones wrapped, and ``checked_launches`` then stays 0, which the test of this
module asserts is not the case on the Triton the project pins.
"""
import threading

import numpy as np
import torch


class OutOfBounds(RuntimeError):
    pass


installed = False
checked_launches = 0  # launches whose accesses were checked (tests/test_interpreter_bounds.py)
_running = threading.local()  # .launches: per launch running, (kernel name, argument extents, their union)


def _extents(name, value, out):
    """(name, first byte, one past the last byte) of every tensor in a launch argument."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            out.append((name, value.data_ptr(), value.data_ptr()))
            return
        last = sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()))
        out.append((name, value.data_ptr(), value.data_ptr() + (last + 1) * value.element_size()))
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _extents(f"{name}[{i}]", v, out)
    elif hasattr(value, "base") and isinstance(getattr(value, "base"), torch.Tensor):  # TensorWrapper, TensorDescriptor
        _extents(name, value.base, out)


def _merged(extents):
    """The union of the extents as sorted disjoint intervals (starts, ends): views of one storage
    (q, k and v of one qkv) overlap."""
    spans = sorted((lo, hi) for _, lo, hi in extents if hi > lo)
    starts, ends = [], []
    for lo, hi in spans:
        if starts and lo <= ends[-1]:
            ends[-1] = max(ends[-1], hi)
        else:
            starts.append(lo)
            ends.append(hi)
    return np.array(starts, dtype=np.uint64), np.array(ends, dtype=np.uint64)


def _describe(address: int, extents) -> str:
    def distance(e):
        _, lo, hi = e
        return 0 if lo <= address < hi else min(abs(address - lo), abs(address - hi))

    if not extents:
        return "the launch has no tensor arguments"
    name, lo, hi = min(extents, key=distance)
    if address >= hi:
        return f"at byte {address - lo} of {name!r}, which spans {hi - lo}"
    if address < lo:
        return f"{lo - address} bytes before {name!r} (which spans {hi - lo})"
    return f"inside {name!r} at byte {address - lo} of {hi - lo}, but its element runs past the end"


def _check(kind: str, ptrs, mask) -> None:
    launches = getattr(_running, "launches", None)
    if not launches:
        return
    kernel, extents, (starts, ends) = launches[-1]
    addresses = ptrs.data
    active = None if mask is None else np.broadcast_to(mask.data, addresses.shape)
    if active is not None and not active.all():
        addresses = addresses[active]
    if addresses.size == 0:
        return
    size = max(ptrs.get_element_ty().primitive_bitwidth // 8, 1)
    # the common case first: all of the access inside one argument's extent
    first, last = int(addresses.min()), int(addresses.max()) + size
    at = int(np.searchsorted(starts, first, side="right")) - 1
    if at >= 0 and last <= int(ends[at]):
        return
    addresses = addresses.reshape(-1).astype(np.uint64)
    at = np.searchsorted(starts, addresses, side="right").astype(np.int64) - 1
    inside = at >= 0
    inside[inside] = addresses[inside] + np.uint64(size) <= ends[at[inside]]
    if not inside.all():
        bad = int(addresses[~inside][0])
        raise OutOfBounds(f"{kernel}: {kind} of {size}-byte elements touches {int((~inside).sum())} "
                          f"address(es) outside its tensor arguments, the first {_describe(bad, extents)}")


def install() -> bool:
    global installed
    if installed:
        return True
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    grid = getattr(interpreter, "GridExecutor", None)
    names = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
    if builder is None or grid is None or any(not hasattr(builder, n) for n in names):
        return False
    launch = grid.__call__
    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def checked_launch(self, *args, **kwargs):
        global checked_launches
        extents = []
        for name, value in zip(getattr(self, "arg_names", ()), args):
            _extents(name, value, extents)
        for name, value in kwargs.items():
            _extents(name, value, extents)
        stack = _running.__dict__.setdefault("launches", [])
        stack.append((getattr(self.fn, "__name__", "a Triton kernel"), extents, _merged(extents)))
        try:
            result = launch(self, *args, **kwargs)
        finally:
            stack.pop()
        checked_launches += 1
        return result

    def masked_load(self, ptrs, mask, other, *rest, **kwargs):
        _check("a load", ptrs, mask)
        return load(self, ptrs, mask, other, *rest, **kwargs)

    def masked_store(self, ptrs, value, mask, *rest, **kwargs):
        _check("a store", ptrs, mask)
        return store(self, ptrs, value, mask, *rest, **kwargs)

    def atomic_rmw(self, op, ptr, val, mask, *rest, **kwargs):
        _check("an atomic", ptr, mask)
        return rmw(self, op, ptr, val, mask, *rest, **kwargs)

    def atomic_cas(self, ptr, cmp, val, *rest, **kwargs):
        _check("an atomic", ptr, None)
        return cas(self, ptr, cmp, val, *rest, **kwargs)

    grid.__call__ = checked_launch
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    installed = True
    return True
