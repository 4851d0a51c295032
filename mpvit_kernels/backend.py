"""Which implementation an op runs: the backend switch and the compiled extension.

Backends (``MPVIT_KERNELS_BACKEND`` or :func:`use_backend`):

- ``auto`` (default): the fastest available implementation per call: Triton or CUDA kernels on
  CUDA tensors, the extension's C++ kernels on CPU tensors (the Triton kernels instead when
  ``TRITON_INTERPRET=1``), the eager reference where neither exists for an op.
- ``reference``: the eager PyTorch ground truth of :mod:`mpvit_kernels.reference` everywhere
  ("kernels off").
- ``cuda``: the compiled extension ``mpvit_kernels._C`` (its CUDA kernels, or their C++ CPU twins
  for CPU tensors) wherever an op has one; an error if the extension is not built.
- ``triton``: the Triton kernels wherever an op has one, ``auto`` elsewhere.

While ``torch.onnx.export`` runs (either exporter), every op takes ``reference`` whatever the
switch says: ONNX has no kernels of ours, and the reference's ATen ops are what it translates.
torch's export flags are process-wide, so during a torch.export-based ONNX export the ops of
other threads take it too (same results, unfused).

GPUs below compute capability 8.0 (V100, T4) take the reference under ``auto``, with one warning:
the extension's cubins are for 8.0 and 9.0, and no kernel of ours was ever run on such a GPU.
``cuda`` and ``triton`` refuse them. An extension built without code for the GPU in use (other
archs, no PTX for it) leaves its CUDA ops to the reference there likewise (``cuda`` refuses).
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import sys
import threading
import warnings
import weakref

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")
OP_FAMILIES = ("affine_hswish", "factor_attention", "dwconv_bn", "gli_projection", "depthwise", "residual_layernorm",
               "linear")

# (backend forced for every op family or None, {op family: backend}): per thread and per
# asyncio task, so one thread's use_backend never changes what another thread's ops run.
_FORCED: contextvars.ContextVar = contextvars.ContextVar("mpvit_kernels_backend", default=(None, {}))
# Dynamo reads a ContextVar (and guards on it) from torch 2.14; before, ContextVar.get stops a
# fullgraph trace. Graphs traced there read this process-wide copy of the switch instead, which
# use_backend keeps (guarded as any global): exact for one thread, while a thread inside
# use_backend changes it for the graphs other threads run.
_DYNAMO_READS_CONTEXTVARS = torch.__version__ >= "2.14"
_forced_for_graphs = (None, {})
_extension: bool | None = None
_extension_cuda = False  # whether _C holds CUDA kernels (a build without nvcc has the CPU twins alone)
_triton: bool | None = None
MIN_CAPABILITY = (8, 0)
_capability: dict[int, tuple[int, int]] = {}  # per CUDA device index
_kernel_image: dict[int, int] = {}  # per CUDA device index: the cudaError_t of finding _C's kernels there, 0 found
_warned: set = set()  # the keys warn_once has warned about


def warn_once(key, message: str, stacklevel: int = 2) -> None:
    """One RuntimeWarning per ``key`` and process (``stacklevel`` as warnings.warn's, from the
    caller); none while torch.compile traces, as Dynamo cannot trace warnings.warn (a fullgraph
    compile would fail)."""
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _onnx_exporting() -> bool:
    """Whether torch.onnx is exporting the running code, with either exporter (the torch.export
    one, torch 2.9's default, or the TorchScript one, which traces): ONNX has no kernels of ours,
    so every op then runs its reference, plain ATen ops that the exporter translates."""
    # (Dynamo folds the tracing state to None, and from torch 2.14 is_exporting() to False outside
    # an export; 2.11's folds it to True in any compiled trace, which then asks the constant below.)
    # The TorchScript exporter's tracing state is per thread, torch.export's flags process-wide
    # (the module docstring).
    return (torch.compiler.is_exporting() or torch._C._get_tracing_state() is not None) and _in_onnx_export()


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing Dynamo, which that call does
    (1.3 of the 1.4 s that ``import mpvit_kernels`` took after ``import torch``): the mark it sets
    on fn, which Dynamo reads when a trace calls fn (torch 2.11-2.14; a test compares the two)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result  # a constant for a strict (Dynamo) export's trace
def _in_onnx_export() -> bool:
    onnx = sys.modules.get("torch.onnx")  # not imported: nothing is exported to ONNX
    return onnx is not None and onnx.is_in_onnx_export()


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend(op: str | None = None) -> str:
    """The backend in force (for op family ``op``): ``reference`` while torch.onnx exports, else
    :func:`use_backend`'s, else ``MPVIT_KERNELS_BACKEND``, else auto."""
    if _onnx_exporting():
        return "reference"
    forced, forced_ops = _forced()
    if op in forced_ops:
        return forced_ops[op]
    if forced is not None:
        return forced
    return _check_name(os.environ.get("MPVIT_KERNELS_BACKEND", "auto") or "auto", "MPVIT_KERNELS_BACKEND")


@contextlib.contextmanager
def use_backend(name: str, ops=None):
    """Run the enclosed code with backend ``name`` (``with use_backend("reference"): ...``), for
    every op family or only those named in ``ops`` (e.g. ``ops=["factor_attention"]``). The
    switch holds for the calling thread (and asyncio task) alone: threads serving requests side
    by side each keep their own; a new thread starts from ``MPVIT_KERNELS_BACKEND``/auto."""
    _check_name(name, "backend")
    if isinstance(ops, str):
        raise TypeError(f"ops must be a list of op family names, got the string {ops!r}")
    unknown = sorted(set(ops or ()) - set(OP_FAMILIES))
    if unknown:
        raise ValueError(f"ops must name op families of {OP_FAMILIES}, got {unknown}")
    global _forced_for_graphs
    forced, forced_ops = _FORCED.get()
    token = _FORCED.set((name, {}) if ops is None else (forced, {**forced_ops, **{op: name for op in ops}}))
    _forced_for_graphs = _FORCED.get()
    try:
        yield
    finally:
        _FORCED.reset(token)
        _forced_for_graphs = _FORCED.get()


def _forced() -> tuple:
    if not _DYNAMO_READS_CONTEXTVARS and torch.compiler.is_compiling():
        return _forced_for_graphs
    return _FORCED.get()


def extension_available() -> bool:
    """Whether ``mpvit_kernels._C`` is built and loaded (registers the ``mpvit_kernels`` ops)."""
    global _extension, _extension_cuda
    if _extension is None:
        if _env_flag("MPVIT_KERNELS_NO_EXTENSION"):
            _extension = False
        else:
            try:
                from mpvit_kernels import _C  # noqa: F401  (loading it registers the ops)

                _extension = True
                _extension_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("mpvit_kernels::depthwise", "CUDA")
            except ImportError:
                _extension = False
    return _extension


def extension_runs_on(device: torch.device) -> bool:
    """Whether the extension holds kernels for tensors on ``device``, whatever the backend switch
    says (the fused ops' backward, which follows its forward's choice): on a GPU, kernels built
    for its arch, or PTX its driver compiles."""
    if not extension_available():
        return False
    return device.type != "cuda" or (_extension_cuda and _kernel_image_found(device))


def _find_kernel_image(index: int) -> int:
    return int(torch.ops.mpvit_kernels.cuda_kernel_image(torch.empty(0, device=torch.device("cuda", index))))


def _kernel_image_found(device: torch.device) -> bool:
    """Whether _C's CUDA kernels load on ``device`` (asked once per device; one warning where they
    do not). A build for other archs without PTX (TORCH_CUDA_ARCH_LIST=8.0 on an H100, say) would
    fail every launch with "no kernel image is available"; its ops take the reference instead.
    A graph that torch.compile traces before any eager call asked cannot run the query, and
    assumes the kernels load."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    status = _kernel_image.get(index)
    if status is None:
        if torch.compiler.is_compiling():
            return True
        status = _kernel_image[index] = _find_kernel_image(index)
    if status:
        props = torch.cuda.get_device_properties(index)
        warn_once(("no kernel image", index),
                  f"mpvit_kernels._C holds no code that runs on cuda:{index} (compute capability {props.major}."
                  f"{props.minor}; CUDA error {status} finding its kernels there): it was built for other GPUs, "
                  "without PTX for this one. Its CUDA ops (affine_hswish, depthwise) run on the eager reference "
                  "path there (same results, unfused); rebuild with TORCH_CUDA_ARCH_LIST naming "
                  f"{props.major}.{props.minor} (or an arch with +PTX at or below it) to get them.", stacklevel=4)
    return status == 0


def _kernels_fit(op: str, device: torch.device, backend: str) -> bool:
    """False for a CUDA device below MIN_CAPABILITY (with one warning per device under auto; an
    error where ``backend`` forces kernels), True for any other device."""
    if device.type != "cuda" or torch.version.hip:
        return True
    index = device.index
    if index is None:
        index = torch.cuda.current_device()
    capability = _capability.get(index)
    if capability is None:
        props = torch.cuda.get_device_properties(index)  # what torch.compile folds to a constant
        capability = (props.major, props.minor)
        if not torch.compiler.is_compiling():  # no side effect for a traced graph to replay
            _capability[index] = capability
    if capability >= MIN_CAPABILITY:
        return True
    what = (f"cuda:{index} has compute capability {capability[0]}.{capability[1]}; mpvit_kernels' kernels need "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ampere and later)")
    if backend in ("cuda", "triton"):
        raise RuntimeError(f"mpvit_kernels: backend {backend!r} asked for the kernels of {op!r}, but {what}")
    warn_once(("old gpu", index), f"{what}: every op runs on the eager reference path there (same results, "
              "unfused).", stacklevel=4)
    return False


def use_extension(op: str, device: torch.device) -> bool:
    """Whether op ``op`` runs its compiled kernel for tensors on ``device``.

    Under ``auto`` a missing extension falls back to the reference, with one warning per
    process; under ``cuda`` it is an error.
    """
    backend = get_backend(op)
    if backend == "reference" or device.type not in ("cpu", "cuda", "meta"):
        return False
    if not extension_available():
        if backend == "cuda":
            raise RuntimeError(
                f"mpvit_kernels: backend 'cuda' asked for the compiled op {op!r}, but mpvit_kernels._C is "
                "not built (installed with MPVIT_KERNELS_NO_EXTENSION=1, or the build failed)")
        warn_once("no extension", "mpvit_kernels._C is not built: compiled ops run on the eager reference path "
                  "(slower, same results). Reinstall without MPVIT_KERNELS_NO_EXTENSION to get the kernels.",
                  stacklevel=3)
        return False
    if device.type != "cuda":
        return True
    if not _extension_cuda:
        what = (f"mpvit_kernels._C was built without its CUDA kernels (no nvcc or CUDA_HOME at install time), "
                f"so {op!r} has no kernel for CUDA tensors")
        if backend == "cuda":
            raise RuntimeError(f"mpvit_kernels: backend 'cuda': {what}")
        warn_once("no cuda kernels", f"{what}: such ops run on the eager reference path on GPUs (same results, "
                  "unfused). Reinstall with nvcc on PATH to get them.", stacklevel=3)
        return False
    # the capability first: a GPU below 8.0 gets that reason, not the missing kernel image
    if not _kernels_fit(op, device, backend):
        return False
    if _kernel_image_found(device):
        return True
    if backend == "cuda":
        raise RuntimeError(f"mpvit_kernels: backend 'cuda' asked for the compiled op {op!r}, but "
                           "mpvit_kernels._C holds no code that runs on this GPU (built for other archs, "
                           "without PTX for it): rebuild with TORCH_CUDA_ARCH_LIST naming its arch")
    return False


def _triton_importable() -> bool:
    """Asked on every attention call: the import is tried once."""
    global _triton
    if _triton is None:
        try:
            import triton  # noqa: F401

            _triton = True
        except ImportError:
            _triton = False
    return _triton


def use_triton(op: str, device: torch.device) -> bool:
    """Whether op ``op`` runs its Triton kernels for tensors on ``device``: CUDA tensors, or CPU
    tensors under Triton's interpreter (``TRITON_INTERPRET=1``, how CI checks the kernels);
    meta tensors go through the registered ops too (their fakes give the shapes)."""
    backend = get_backend(op)
    if backend == "reference":
        return False
    kind = device.type  # a fresh str each time it is read: read once
    if kind == "meta":  # shapes only: the registered ops' fakes, no kernel (traffic counts)
        return True
    runs_here = kind == "cuda" or (kind == "cpu" and _env_flag("TRITON_INTERPRET"))
    if runs_here and _triton_importable():
        return _kernels_fit(op, device, backend)
    if backend == "triton":
        raise RuntimeError(
            f"mpvit_kernels: backend 'triton' asked for the Triton kernels of {op!r} on {device.type} tensors; "
            "they run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before triton is imported")
    return False


def use_cpu_kernel(op: str, device: torch.device) -> bool:
    """Whether op ``op``, whose GPU kernels are Triton's, runs the extension's C++ CPU twin for
    tensors on ``device``: CPU tensors, except under ``reference``, and except where Triton's
    interpreter runs them (``TRITON_INTERPRET=1`` under ``auto`` or ``triton``: how CI checks the
    Triton kernels without a GPU). ``cuda`` always takes the twin on CPU tensors."""
    if device.type != "cpu":  # before the switch, whose environment read a GPU call need not pay
        return False
    backend = get_backend(op)
    # triton: use_triton runs the interpreter, or says why it cannot
    if backend in ("reference", "triton"):
        return False
    if backend == "auto" and _env_flag("TRITON_INTERPRET") and _triton_importable():
        return False
    return use_extension(op, device)


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast casts ``t`` to as a conv's or a matmul's input: inside an autocast
    region for its device, the autocast dtype for a float16/bfloat16/float32 tensor; else (float64
    too, as autocast leaves it) t's own."""
    if not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled():
        return t.dtype  # eager code outside autocast (every op call asks): a quarter of the checks below
    if (t.dtype in (torch.float16, torch.bfloat16, torch.float32) and t.device.type in ("cpu", "cuda")
            and torch.is_autocast_enabled(t.device.type)):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without its dispatch where t has that dtype already: about 1 us a call on
    this project's CPU, and a training step's backward formulas ask for about a thousand such
    casts (MPViT-S), most of them to the dtype their tensor has."""
    return t if t.dtype == dtype else t.to(dtype)


def autocast(t):
    """``t`` as autocast casts a conv's or a matmul's input (:func:`autocast_dtype`); anything but
    a tensor unchanged. The fused ops call it on their activations, so they compute in the
    autocast dtype (accumulating in fp32) and return it, as eager would."""
    return t.to(autocast_dtype(t)) if isinstance(t, torch.Tensor) else t


def refuse_double_backward(op: str) -> None:
    """Give the backward op ``op`` an autograd formula that refuses with a clear error: our ops
    have first derivatives only, and without it a second derivative (``create_graph=True``, then
    a backward through the grads: gradient penalties, Hessian-vector products) fails with
    PyTorch's generic message about a missing autograd kernel."""
    def backward(ctx, *grads):
        raise RuntimeError(f"{op}: mpvit_kernels ops have first derivatives only; a second derivative (double "
                           "backward) is not supported. Run this part with mpvit_kernels.use_backend('reference').")

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


# One Triton launch at a time in this process. Triton's Autotuner keeps the launch's arguments
# on itself while it tunes (run() sets self.nargs, its benchmarks and prune read it, the end of
# any run clears it), so two threads tuning one kernel break each other (TypeError); the
# interpreter patches triton.language for the duration of a launch. Launching is Python under
# the GIL anyway (the kernels themselves run asynchronously): the lock serialises nothing else.
# Reentrant: a launch inside a launch's context (a grid function, a tuner's pre-hook) may launch.
_LAUNCH_LOCK = threading.RLock()


class _OnDevice:
    """triton_device's context for a CUDA tensor (a class, not a generator context manager: this
    runs at every launch, and the generator's machinery cost 1.5 us of host time each)."""
    __slots__ = ("device", "guard")

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        _LAUNCH_LOCK.acquire()
        try:
            self.guard = torch.cuda.device(self.device)
            self.guard.__enter__()
        except BaseException:
            _LAUNCH_LOCK.release()
            raise

    def __exit__(self, *exc):
        try:
            self.guard.__exit__(*exc)
        finally:
            _LAUNCH_LOCK.release()


def triton_device(t: torch.Tensor):
    """Context for a Triton launch on ``t``: Triton launches on the current CUDA device, not the
    tensors', so make it theirs (nothing to do for CPU tensors under the interpreter); and hold
    the process's launch lock (see _LAUNCH_LOCK), so that threads may call the ops side by side."""
    return _OnDevice(t.device) if t.is_cuda else _LAUNCH_LOCK


# Tensors with nothing of their own to dispatch (a subclass such as FakeTensor needs the op).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# Dispatch below the autograd keys: what a C++ op's registered (Python) autograd does itself when
# no input needs grads, before it calls the kernel.
_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd


# op (a custom_op, or an extension op's OpOverload) -> (setup_context, backward, the schema's
# argument count, the defaults of its trailing arguments): the autograd formulas
# register_autograd gave torch, for call_op's eager path
_AUTOGRAD: dict = {}


def register_autograd(op, backward, setup_context) -> None:
    """``op``'s autograd formula: registered with torch.library (the dispatcher's path, which
    torch.compile, torch.export and dispatch modes take) and kept for :func:`call_op`, which
    runs the same two functions on a plain autograd node in eager code. ``op``: a custom op, or
    an extension op's qualified name ("mpvit_kernels::depthwise")."""
    if isinstance(op, str):
        torch.library.register_autograd(op, backward, setup_context=setup_context)
        namespace, name = op.split("::")
        op = getattr(getattr(torch.ops, namespace), name).default
        schema = op._schema
    else:
        op.register_autograd(backward, setup_context=setup_context)
        schema = op._opoverload._schema
    # setup_context sees every argument, those left to their defaults too (as torch.library passes
    # them): the defaults of the trailing arguments that have one
    defaults = []
    for argument in reversed(schema.arguments):
        if not argument.has_default_value():
            break
        defaults.insert(0, argument.default_value)
    _AUTOGRAD[op] = (setup_context, backward, len(schema.arguments), tuple(defaults))


def _regroup(flat, spec) -> list:
    """call_op's arguments back from their flat form: spec holds -1 for an argument passed as
    is, n for a list of n tensors."""
    args, i = [], 0
    for n in spec:
        if n < 0:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i:i + n]))
            i += n
    return args


class _EagerAutograd(torch.autograd.Function):
    """call_op's autograd node in eager code: the op run below autograd, then its own
    setup_context and backward (``register_autograd``'s), without the dispatcher's layers around
    them (torch.library's Python autograd kernel: its pytree flattening of tensor lists, the
    re-binding of every argument to the schema, a second dispatch to the implementation). The
    grads are the registered path's, the same functions computing them; lists of tensors are
    passed flat, so that autograd sees each tensor."""

    @staticmethod
    def forward(ctx, op, spec, *flat):
        args = _regroup(flat, spec)
        fn = getattr(op, "_init_fn", None)
        if fn is not None:
            out = fn(*args)
        else:
            with _BELOW_AUTOGRAD():
                out = op(*args)
        ctx._mpvit_call = op, spec
        _AUTOGRAD[op][0](ctx=ctx, inputs=tuple(args), output=out)
        return out

    @staticmethod
    def backward(ctx, *grads):
        op, spec = ctx._mpvit_call
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = tuple(_regroup(needs[2:], spec))  # as the op's inputs, for its backward
        try:
            got = _AUTOGRAD[op][1](ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        got = got if isinstance(got, tuple) else (got,)
        if len(got) != len(spec):
            raise RuntimeError(f"the backward of {op} returned {len(got)} grads for {len(spec)} inputs")
        flat = [None, None]
        for n, g in zip(spec, got):
            if n < 0:
                flat.append(g)
            elif g is None:
                flat.extend([None] * n)
            elif isinstance(g, (list, tuple)) and len(g) == n:
                flat.extend(g)
            else:
                raise RuntimeError(f"the backward of {op} returned {type(g).__name__} for a list of {n} tensors")
        return tuple(flat)


def call_op(op, *args):
    """``op(*args)`` for one of our ops, the short way where nothing needs the dispatcher's
    layers: eager code (not traced by torch.compile, torch.export or torch.jit.trace), no
    TorchDispatchMode, functorch transform or profiler active, plain tensors on a real device.
    There an op defined with ``torch.library.custom_op`` is called straight into its
    implementation (its registered layers took 26 us of a linear call's 100 on this project's
    CPU, the kernel launch stubbed), and an extension op (an ``OpOverload``, e.g.
    ``torch.ops.mpvit_kernels.depthwise.default``) below autograd, skipping the Python of its
    registered autograd (3.5 us of 11 for a small depthwise conv): host time that a GPU cannot
    hide where the host is the slower side. Where an autograd graph is recorded, an op given
    its formula through :func:`register_autograd` runs on a plain autograd node with that
    formula (``_EagerAutograd``: a ``linear`` call with its backward 300 -> 256 us). The same
    kernels run either way; an op without such a formula (a backward op, which refuses a second
    derivative) goes through the dispatcher."""
    fn = getattr(op, "_init_fn", None)  # the undecorated implementation (torch 2.4+)
    extension_op = isinstance(op, torch._ops.OpOverload)
    if ((fn is None and not extension_op) or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active() or torch._C._autograd._profiler_enabled()
            or torch._C._get_tracing_state() is not None):
        return op(*args)
    grad, graph, lists = torch.is_grad_enabled(), False, False
    for arg in args:  # (the common kinds by type first: isinstance costs a call per argument)
        kind = type(arg)
        if kind in _PLAIN_TENSORS:
            if arg.is_meta:
                return op(*args)
            graph = graph or (grad and arg.requires_grad)
        elif kind is int or kind is float or kind is bool or arg is None:
            continue
        elif isinstance(arg, (list, tuple)):
            lists = True
            for t in arg:
                if isinstance(t, torch.Tensor):
                    if type(t) not in _PLAIN_TENSORS or t.is_meta:
                        return op(*args)
                    graph = graph or (grad and t.requires_grad)
        elif isinstance(arg, torch.Tensor):  # a subclass: through the dispatcher's layers
            return op(*args)
    if graph:
        formulas = _AUTOGRAD.get(op)
        if formulas is None:
            return op(*args)
        missing = formulas[2] - len(args)
        if 0 < missing <= len(formulas[3]):
            args += formulas[3][len(formulas[3]) - missing:]
        if not lists:
            return _EagerAutograd.apply(op, (-1,) * len(args), *args)
        spec, flat = [], []
        for arg in args:
            if isinstance(arg, (list, tuple)):
                spec.append(len(arg))
                flat.extend(arg)
            else:
                spec.append(-1)
                flat.append(arg)
        return _EagerAutograd.apply(op, tuple(spec), *flat)
    if fn is not None:
        return fn(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


# ---- values derived from parameters, kept until the parameters change ----------------------

# ids of the sources -> (weak references to them, state, value, streams: None for a value off
# CUDA, else [the event recorded after it was made, the ids of the streams that may read it])
_DERIVED: collections.OrderedDict = collections.OrderedDict()
# an MPViT-B forward under autocast holds about 160: BatchNorm folds, CRPE packings, weight casts
_DERIVED_SIZE = 512
_DERIVED_LOCK = threading.Lock()
_FREED: list = []  # keys of entries whose source died while the lock was held: dropped at the next call
_FAKE_MODE = torch._C._TorchDispatchModeKey.FAKE


def _drop_dead(key, derived=_DERIVED) -> None:
    """Under _DERIVED_LOCK: the entry at ``key`` goes if one of its sources has died (the key may
    already hold a newer entry, under ids the dead ones freed)."""
    entry = derived.get(key)
    if entry is not None and any([r is not None and r() is None for r in entry[0]]):
        del derived[key]


def _on_source_freed(key, lock=_DERIVED_LOCK, freed_keys=_FREED, drop=_drop_dead):
    # (what it uses bound here: at interpreter exit the module's globals may be gone first)
    def freed(_ref):
        # a deleted model's folds and casts go with it. The callback may run inside this module's
        # own locked code (a garbage collection there): then the drop waits for the next call.
        if lock.acquire(blocking=False):
            try:
                drop(key)
            finally:
                lock.release()
        else:
            freed_keys.append(key)
    return freed


def current_stream(device: torch.device):
    """The id of ``device``'s current CUDA stream (None for any other device); read straight
    from torch._C, as torch.cuda.current_stream builds a Stream object at every call."""
    return torch._C._cuda_getCurrentStream(device.index)[0] if device.type == "cuda" else None


def _made_on_stream(device: torch.device) -> list:
    """A new CUDA value's stream record: an event after its computation, and the id of the
    stream it was made on, which may read it at once."""
    event = torch.cuda.Event()
    event.record()
    return [event, {current_stream(device)}]


def _share_with_current_stream(value, streams: list, device: torch.device) -> None:
    """Let the current stream read ``value``, made on another: it waits for the computation,
    and the caching allocator is told that this stream uses the value's memory, so that a
    dropped value is not reused before this stream's reads are done."""
    stream = torch.cuda.current_stream(device)
    stream.wait_event(streams[0])
    for t in value if isinstance(value, tuple) else (value,):
        if isinstance(t, torch.Tensor):
            t.record_stream(stream)
    streams[1].add(stream.stream_id)


def cached_by_version(sources, extra, compute):
    """``compute()`` once per version of the tensors ``sources`` (None allowed) and of ``extra``
    (hashable settings), then the same value until one of them changes: an in-place write bumps a
    tensor's version, module.to() changes its data_ptr, a new tensor its identity (an entry holds
    weak references to its sources and goes when one of them dies, so a deleted model's values are
    freed with it, and a reused id never matches a dead source). A write through ``.data`` bumps
    no version: :func:`clear_caches` after such writes. Used for eval BatchNorm folds, packed
    CRPE weights and weight casts, never where the value must be part of an autograd graph;
    ``compute`` makes new tensors (a value holding a source alive would keep its entry too).

    Computed afresh, and not kept, inside a CUDA graph capture (the graph then computes it from
    the sources at each replay, as autocast's cast cache must be off in a capture: a cached value
    would be a tensor the cache frees or replaces while the graph still reads it, and blind to
    in-place changes of the sources) and for inference tensors (made under torch.inference_mode),
    which have no version counter.

    One value for every CUDA stream: the first time another stream than the one it was made on
    asks for it, that stream waits for an event recorded after its computation, and the value's
    memory is recorded as used by that stream (record_stream), so that once dropped (a new
    version, an eviction) the caching allocator reuses it only after that stream's reads. Without
    either, a value could be read before its computation ended, or its memory reused while
    another stream still read it."""
    if (torch._C._get_dispatch_mode(_FAKE_MODE) is not None or torch._C._are_functorch_transforms_active()
            or torch._C._get_tracing_state()
            or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())):
        # FakeTensorMode (its fake values must not be kept for real tensors), a functorch
        # transform (vmap's batched parameters have no storage), torch.jit.trace (from the
        # parameters in the trace, not a cached constant) or a CUDA graph capture (above)
        return compute()
    try:  # list comprehensions, not generators: this runs per BatchNorm per forward
        state = (tuple([None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in sources]),
                 extra, torch.is_inference_mode_enabled())
    except RuntimeError:  # "Inference tensors do not track version counter"
        if not any([t is not None and t.is_inference() for t in sources]):
            raise
        warn_once("inference-tensor-sources",
                  "mpvit_kernels: parameters made under torch.inference_mode have no version counter, so eval "
                  "BatchNorm folds, CRPE packings and weight casts are recomputed at every call; build or load "
                  "the model outside inference_mode (running it inside is fine) to have them cached", stacklevel=3)
        return compute()
    key = tuple([id(t) for t in sources])
    with _DERIVED_LOCK:  # another thread's eviction between a lookup and its move_to_end: KeyError
        while _FREED:
            _drop_dead(_FREED.pop())
        hit = _DERIVED.get(key)
        # (a None source sits where the entry has None: id(None) is no tensor's id)
        if hit is not None and hit[1] == state and all([r is None or r() is t for r, t in zip(hit[0], sources)]):
            _DERIVED.move_to_end(key)
        else:
            hit = None
    if hit is not None:
        streams = hit[3]
        if streams is not None:  # (outside the lock: CUDA calls)
            device = next(t for t in sources if t is not None).device
            if current_stream(device) not in streams[1]:
                _share_with_current_stream(hit[2], streams, device)
        return hit[2]
    value = compute()
    first = next((t for t in sources if t is not None), None)
    streams = _made_on_stream(first.device) if first is not None and first.is_cuda else None
    freed = _on_source_freed(key)
    refs = tuple([None if t is None else weakref.ref(t, freed) for t in sources])
    with _DERIVED_LOCK:
        _DERIVED[key] = (refs, state, value, streams)
        _DERIVED.move_to_end(key)
        while len(_DERIVED) > _DERIVED_SIZE:
            _DERIVED.popitem(last=False)
    return value


def weight_as(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype`` for a GEMM autocast does not see (an in-place ``addmm_``, our own
    kernels' GEMMs), cast once per version of the weight where no autograd graph needs the cast (as nn.folded_bn)."""
    if weight.dtype == dtype:
        return weight
    if (torch.is_grad_enabled() and weight.requires_grad) or torch.compiler.is_compiling():
        return weight.to(dtype)
    with torch.no_grad():
        return cached_by_version((weight,), dtype, lambda: weight.to(dtype))


def clear_caches() -> None:
    """Drop every cached eval BatchNorm fold and CRPE weight packing. The caches follow the
    tensors' version counters, which any in-place change bumps, except a write through ``.data``
    (PyTorch gives it a counter of its own): call this after such writes."""
    with _DERIVED_LOCK:
        _DERIVED.clear()
