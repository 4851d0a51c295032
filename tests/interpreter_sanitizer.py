"""Test-only: every memory access of an interpreted Triton launch checked as compute-sanitizer
checks a GPU's (memcheck; racecheck's question asked of the whole grid), and AddressSanitizer the
CUDA kernels' host runs (tests/cuda_host).

The interpreter reads and writes whatever address a lane computes, and runs a launch's programs
one after another. So a lane a kernel forgot to mask reads a neighbour's bytes or writes over
them, and two programs that write one element, or one that reads what another writes, give the
last program's answer; the test may still pass. On a GPU the stray lane reads another tensor of
the caching allocator's block, corrupts it or faults, and the programs run in no set order. Here:

- bounds: each load, store and atomic checks the addresses of its active lanes (the mask's True
  ones, all of a scalar access): each element must lie within the extent of one tensor argument
  of the launch, from its first element to one past its last (its storage offset and strides; a
  tensor descriptor's loads are masked to its shape first, then checked against its base). The
  rest of the storage is out of bounds too: a kernel given a view reads that view. The first
  access outside raises OutOfBounds;
- races: at the end of a launch, no element may be stored by two programs, nor loaded by a
  program other than the one that stores it (Race), elements compared by their first byte.
  Atomics are left out of this (they are for sharing; the kernels have none).

- devices: a kernel of the package launched outside ``backend.triton_device`` raises
  UnguardedLaunch: Triton launches on the current CUDA device, not the tensors', so on a GPU
  other than the current one such a launch reads another device's addresses (and it would run
  without the launch lock that lets threads tune side by side);
- grids: a launch of more programs than CUDA's grid limits (2^31 - 1 on the first axis, 65535 on
  the others) raises GridTooLarge, as a GPU refuses it;
- undefined lanes: a masked load without ``other`` leaves its masked-off lanes undefined on a GPU,
  where the interpreter gave zeros; here they are NaN (integers: their largest value), so a kernel
  that reduces or stores them fails its test.

Each names the kernel, the programs and where the address lies against the nearest argument.
Installed by conftest when the kernels run interpreted, so every launch of the suite is checked
(6-10% of the interpreted kernel tests' time). ``install`` returns False where the interpreter's
internals are not the ones wrapped; tests/test_interpreter_sanitizer.py then skips, saying so.
"""
import threading

import numpy as np
import torch


class OutOfBounds(RuntimeError):
    pass


class Race(RuntimeError):
    pass


class GridTooLarge(RuntimeError):
    pass


class UnguardedLaunch(RuntimeError):
    pass


# CUDA's grid limits, which a GPU's launch refuses past and the interpreter never checked
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


installed = False
checked_launches = 0  # launches whose accesses were checked (tests/test_interpreter_sanitizer.py)
_running = threading.local()  # .launches: a _Launch per launch running (one may launch inside another's pre-hook)


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
    if address < lo:
        return f"{lo - address} bytes before {name!r} (which spans {hi - lo})"
    return f"at byte {address - lo} of {name!r}, which spans {hi - lo}"


def _unique(parts) -> np.ndarray:
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)


class _Launch:
    """One launch's argument extents and, per program, the elements it stored and loaded (their
    first bytes)."""

    def __init__(self, kernel, extents):
        self.kernel, self.extents = kernel, extents
        self.starts, self.ends = _merged(extents)
        self.program, self.reads, self.writes, self.done = None, [], [], []

    def access(self, kind: str, ptrs, mask, program, write) -> None:
        """Bounds-check an access of the running program (``write``: a store; None: an atomic,
        left out of the race check) and record it."""
        addresses = ptrs.data
        if mask is not None:
            active = np.broadcast_to(mask.data, addresses.shape)
            if not active.all():
                addresses = addresses[active]
        if addresses.size == 0:
            return
        size = max(ptrs.get_element_ty().primitive_bitwidth // 8, 1)
        # the common case first: the whole access inside one argument's extent
        first, last = int(addresses.min()), int(addresses.max()) + size
        at = int(np.searchsorted(self.starts, first, side="right")) - 1
        if at < 0 or last > int(self.ends[at]):
            flat = addresses.reshape(-1).astype(np.uint64)
            at = np.searchsorted(self.starts, flat, side="right").astype(np.int64) - 1
            inside = at >= 0
            inside[inside] = flat[inside] + np.uint64(size) <= self.ends[at[inside]]
            if not inside.all():
                raise OutOfBounds(f"{self.kernel}: {kind} of {size}-byte elements touches {int((~inside).sum())} "
                                  f"address(es) outside its tensor arguments, the first "
                                  f"{_describe(int(flat[~inside][0]), self.extents)}")
        if write is None:
            return
        if program != self.program:
            self.close_program()
            self.program = program
        (self.writes if write else self.reads).append(addresses.reshape(-1))

    def close_program(self):
        if self.program is not None and (self.reads or self.writes):
            self.done.append((self.program, _unique(self.writes), _unique(self.reads)))
        self.program, self.reads, self.writes = None, [], []

    def check_races(self):
        """No element stored by two programs, nor loaded by one that another stores: a GPU runs
        the programs in no set order (the interpreter one after another)."""
        self.close_program()
        if len(self.done) < 2:
            return
        writes = [w for _, w, _ in self.done]
        owners = np.repeat(np.arange(len(writes)), [len(w) for w in writes])
        written = np.concatenate(writes)
        order = np.argsort(written, kind="stable")
        written, owners = written[order], owners[order]
        if written.size == 0:
            return
        twice = np.nonzero(written[1:] == written[:-1])[0]
        if twice.size:
            i = int(twice[0])
            raise Race(f"{self.kernel}: programs {self.done[owners[i]][0]} and {self.done[owners[i + 1]][0]} both "
                       f"store the element {_describe(int(written[i]), self.extents)}")
        for k, (program, _, read) in enumerate(self.done):
            at = np.minimum(np.searchsorted(written, read), written.size - 1)
            hit = np.nonzero((written[at] == read) & (owners[at] != k))[0]
            if hit.size:
                raise Race(f"{self.kernel}: program {program} loads the element "
                           f"{_describe(int(read[hit[0]]), self.extents)}, which program "
                           f"{self.done[owners[at[hit[0]]]][0]} stores in the same launch")


def _running_launch():
    launches = getattr(_running, "launches", None)
    return launches[-1] if launches else None


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
    names = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas", "set_grid_idx",
             "set_grid_dim")
    if builder is None or grid is None or any(not hasattr(builder, n) for n in names):
        return False
    launch = grid.__call__
    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    from mpvit_kernels import backend

    def checked_launch(self, *args, **kwargs):
        global checked_launches
        if getattr(self.fn, "__module__", "").startswith("mpvit_kernels.") and not backend._LAUNCH_LOCK._is_owned():
            raise UnguardedLaunch(f"{self.fn.__name__} launched outside backend.triton_device: on a GPU it would "
                                  "launch on the current device, not its tensors', without the launch lock")
        extents = []
        for name, value in zip(getattr(self, "arg_names", ()), args):
            _extents(name, value, extents)
        for name, value in kwargs.items():
            _extents(name, value, extents)
        stack = _running.__dict__.setdefault("launches", [])
        running = _Launch(getattr(self.fn, "__name__", "a Triton kernel"), extents)
        stack.append(running)
        try:
            result = launch(self, *args, **kwargs)
        finally:
            stack.pop()
        running.check_races()
        checked_launches += 1
        return result

    handle = getattr(interpreter, "TensorHandle", None)
    np_dtype = getattr(interpreter, "_get_np_dtype", None)

    def undefined(ptrs):
        """What a masked-off lane of a load without ``other`` holds: undefined on a GPU, zero in
        the interpreter; here NaN (integers: their largest value), so a kernel that uses it shows."""
        elem = ptrs.get_element_ty()
        dtype = np_dtype(elem)
        fill = np.nan if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max if np.issubdtype(
            dtype, np.integer) else 0
        return handle(np.full(ptrs.data.shape, fill, dtype=dtype), elem)

    def masked_load(self, ptrs, mask, other, *rest, **kwargs):
        if (running := _running_launch()) is not None:
            running.access("a load", ptrs, mask, self.grid_idx, False)
        if other is None and mask is not None and handle is not None and np_dtype is not None:
            other = undefined(ptrs)
        return load(self, ptrs, mask, other, *rest, **kwargs)

    def masked_store(self, ptrs, value, mask, *rest, **kwargs):
        if (running := _running_launch()) is not None:
            running.access("a store", ptrs, mask, self.grid_idx, True)
        return store(self, ptrs, value, mask, *rest, **kwargs)

    def atomic_rmw(self, op, ptr, val, mask, *rest, **kwargs):
        if (running := _running_launch()) is not None:
            running.access("an atomic", ptr, mask, self.grid_idx, None)
        return rmw(self, op, ptr, val, mask, *rest, **kwargs)

    def atomic_cas(self, ptr, cmp, val, *rest, **kwargs):
        if (running := _running_launch()) is not None:
            running.access("an atomic", ptr, None, self.grid_idx, None)
        return cas(self, ptr, cmp, val, *rest, **kwargs)

    grid_dim = builder.set_grid_dim

    def checked_grid_dim(self, *dims):
        if any(d > limit for d, limit in zip(dims, GRID_LIMITS)):
            running = _running_launch()
            raise GridTooLarge(f"{running.kernel if running is not None else 'a Triton kernel'}: a grid of {dims} "
                               f"programs, past CUDA's limits {GRID_LIMITS}: a GPU refuses the launch")
        return grid_dim(self, *dims)

    grid.__call__ = checked_launch
    builder.set_grid_dim = checked_grid_dim
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    installed = True
    return True
