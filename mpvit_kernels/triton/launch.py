"""What every Triton family's launches share: whether the kernels run interpreted
(``INTERPRET``) and autotune (``AUTOTUNE``), the vector width of channel rows
(``vector_width``), ``next_pow2``, and the launch wrappers ``pinned`` and ``tuned`` (Triton's
heuristics and autotune with less host time a launch), which launch through ``DirectLaunch``.
"""
import functools
import os

import torch
import triton
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# Triton's interpreter runs the kernels (on CPU tensors): read at import, as Triton reads it.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The tuned families autotune their tiles; MPVIT_KERNELS_AUTOTUNE=0 pins each to its first
# fitting tile (compute-sanitizer, runs that must not spend time tuning), and so does the interpreter.
AUTOTUNE = not INTERPRET and os.environ.get("MPVIT_KERNELS_AUTOTUNE", "1") not in ("", "0")


def vector_width(element_size: int, *extents: int) -> int:
    """VEC of the kernels that read rows of channels: the largest power of two up to 8 that every
    one of ``extents`` (channel counts and row strides, in elements) is a multiple of. Triton's
    launch marks an integer argument aligned only when it is a multiple of 16, so a width such as
    MPViT-S's 216 would otherwise be read one element at a time, which also rules out cp.async
    pipelining in the GEMMs; 8 is 16 bytes of a 16-bit dtype, and a multiple of 8 is a multiple
    of fp32's 4 too. 1 for 8-byte elements: fp64 is the gradcheck path, compiled (and checked for
    spills) in its worst-case form only."""
    if element_size >= 8:
        return 1
    vec = 8
    while vec > 1 and any(e % vec for e in extents):
        vec //= 2
    return vec


def next_pow2(n: int) -> int:
    """The next power of two from n, 1 for n <= 1 (triton.next_power_of_2's value for n >= 1), in
    0.03 us of host time where that one (a constexpr function object) takes 2 us, at every launch."""
    return 1 << (max(n, 1) - 1).bit_length()


class DirectLaunch:
    """Launches of the JIT function ``fn`` that skip Triton's argument binding once a launch of the
    same kind went through it: ``JITFunction.run`` binds every argument to the signature,
    specialises it and builds the compiled-kernel cache's key at every launch (a launch of
    ``linear``'s kernel in a loop, the driver's call stubbed, on this project's CPU: 17.6-19.6
    us through ``JITFunction.run``, 10.5-11.1 here). Launched here, a compiled kernel is looked
    up under a key at least as fine as Triton's specialisation and options: the current device;
    the debug and instrumentation knobs; for each tensor its dtype and its address modulo 16;
    for each runtime integer whether it is 1, a multiple of 16, 32- or 64-bit; a float's type;
    every constexpr, option and other value itself, with its type. A key seen for the first
    time (or anything else: hooks before the launch, an argument of another kind, a runtime argument passed by
    keyword, a global the kernel read changed since, Triton's interpreter, a Triton other than
    3.6-3.8 or a backend other than NVIDIA's) goes through ``JITFunction.run``, which compiles
    or finds the kernel and launches it; the kernel it returns is kept under the key, with the
    values of the arguments after the positional ones (constexprs and defaults, which the key
    holds). A hit then calls the kernel's launcher as ``JITFunction.run`` does (Triton 3.6-3.8):
    the grid from the arguments by name, every argument in signature order, the launch hooks
    of the moment (their metadata only where a hook is set: Triton builds it for their empty
    chains too, 10 us). The key comes from code generated once per call shape (the number of
    positional arguments, the keywords' names; :meth:`fast_key`): 3.0 us for ``linear``'s
    fourteen arguments where the general :meth:`key` takes 4.6. ``VERIFY``
    (tools/stand_in_gpu.py sets it) checks each hit against Triton's own binding: the same
    compiled kernel, the same arguments."""

    VERIFY = False
    verified: set = set()  # (VERIFY) the names of the kernels whose direct launches were checked
    # the Triton versions whose launch path this follows, on NVIDIA's backend (AMD's specialises
    # tensors on more than their alignment): decided at the first launch; never with
    # MPVIT_KERNELS_DIRECT_LAUNCH=0 (every launch through JITFunction.run, to tell a launch-path
    # problem from a kernel's)
    VERSIONS = ("3.6.", "3.7.", "3.8.")
    supported: bool | None = False if os.environ.get("MPVIT_KERNELS_DIRECT_LAUNCH", "1") in ("", "0") else None

    def __init__(self, fn) -> None:
        self.fn = fn
        self.jit = type(fn) is JITFunction  # (an InterpretedFunction under TRITON_INTERPRET=1)
        params = fn.params if self.jit else ()
        self.names = [p.name for p in params]
        self.constexpr = [p.is_constexpr for p in params]
        self.defaults = {p.name: p.default for p in params if p.has_default}
        self.runtime = {p.name for p in params if not p.is_constexpr}
        self.kernels = {}  # key -> (kernel, the values after the positional ones, device)
        self.keywords = {}  # the names of a launch's keywords -> whether none is a runtime argument
        self._keys = {}  # (positional count, keyword names) -> the key function generated for them

    def direct(self) -> bool:
        """Whether a launch may skip Triton's path at all (but for ``warmup``)."""
        return self.jit and not self.fn.pre_run_hooks and self._supported() and \
            knobs.runtime.add_stages_inspection_hook is None

    def key(self, args, kwargs):
        """The launch's key, or None where Triton's own path must launch it."""
        names = tuple(kwargs)
        plain = self.keywords.get(names)
        if plain is None:
            plain = self.keywords[names] = not self.runtime.intersection(names)
        if not plain or len(args) > len(self.names):
            return None
        # (Triton's options take the debug and instrumentation knobs: plain attributes)
        # (the values' types too: 2 and 2.0, True and 1 are one dict key, but the kept values
        # must be this launch's, and Triton's Autotuner keys a numpy scalar by its dtype)
        key = [driver.active.get_current_device(), self.fn.debug, knobs.runtime.debug,
               knobs.compilation.instrumentation_mode, names, *kwargs.values(), *map(type, kwargs.values())]
        for a, constexpr in zip(args, self.constexpr):
            t = type(a)
            if constexpr:
                key += (a, t)
            elif t is torch.Tensor or t is torch.nn.Parameter:
                key += (a.dtype, a.data_ptr() & 15)
            elif a is None or t is bool:
                key.append(a)
            elif t is int:
                if not -2**63 <= a < 2**64:  # (Triton refuses it)
                    return None
                key.append((a == 1, (a & 15) == 0, -2**31 <= a < 2**31, a < 2**63))
            elif t is float:
                key.append(float)
            else:
                return None
        return tuple(key)

    def fast_key(self, args, kwargs):
        """:meth:`key`'s value, from code generated for the call's shape at its first launch: the
        kind of each positional argument then (a tensor, an int, ...) is checked, and its part of
        the key computed inline; any other kind goes to :meth:`key`."""
        shape = len(args), tuple(kwargs)
        keyer = self._keys.get(shape)
        if keyer is None:
            keyer = self._generate_key(args, kwargs)
            if keyer is None:  # an argument the key cannot take, this time: no code for the shape yet
                return None
            self._keys[shape] = keyer
        return keyer(args, kwargs)

    def _generate_key(self, args, kwargs):
        if self.runtime.intersection(kwargs) or len(args) > len(self.names):
            return self.key  # Triton's path for every launch of this shape (a runtime keyword)
        if self.key(args, kwargs) is None:  # an argument of a kind the key cannot take
            return None
        checks, parts = [], []
        for i, (a, constexpr) in enumerate(zip(args, self.constexpr)):
            t, v = type(a), f"a{i}"
            if constexpr:
                parts.append(f"{v}, type({v})")
            elif t is torch.Tensor or t is torch.nn.Parameter:
                checks.append(f"(type({v}) is _Tensor or type({v}) is _Parameter)")
                parts.append(f"{v}.dtype, {v}.data_ptr() & 15")
            elif a is None:
                checks.append(f"{v} is None")
                parts.append(v)
            elif t is bool:
                checks.append(f"type({v}) is bool")
                parts.append(v)
            elif t is int:
                checks.append(f"type({v}) is int and {-2**63} <= {v} < {2**64}")
                parts.append(f"({v} == 1, ({v} & 15) == 0, {-2**31} <= {v} < {2**31}, {v} < {2**63})")
            else:  # float
                checks.append(f"type({v}) is float")
                parts.append("float")
        unpack = f"    {''.join(f'a{i}, ' for i in range(len(args)))}= args\n" if args else ""
        check = f"    if not ({' and '.join(checks)}):\n        return general(args, kwargs)\n" if checks else ""
        source = (f"def fast_key(args, kwargs):\n{unpack}{check}"
                  f"    return (driver.active.get_current_device(), fn.debug, knobs.runtime.debug, "
                  f"knobs.compilation.instrumentation_mode, names, *kwargs.values(), *map(type, kwargs.values()), "
                  f"{', '.join(parts)})\n")
        scope = {"driver": driver, "knobs": knobs, "fn": self.fn, "names": tuple(kwargs), "general": self.key,
                 "_Tensor": torch.Tensor, "_Parameter": torch.nn.Parameter}
        exec(compile(source, f"<DirectLaunch key of {self.fn.__name__}>", "exec"), scope)
        return scope["fast_key"]

    @classmethod
    def _supported(cls) -> bool:
        if cls.supported is None:
            cls.supported = triton.__version__.startswith(cls.VERSIONS) and \
                driver.active.get_current_target().backend == "cuda"
        return cls.supported

    def globals_changed(self) -> bool:
        """Whether a global the kernel read has changed since it was compiled (Triton's path then
        says so)."""
        used = self.fn.used_global_vals
        return bool(used) and any(g.get(name, _ABSENT) != value for (name, _), (value, g) in used.items())

    def run(self, *args, grid, warmup=False, **kwargs):
        return self.launch(args, kwargs, grid, warmup)[0]

    def launch(self, args, kwargs, grid, warmup=False):
        """Launch; returns the compiled kernel and its entry for :meth:`launch_entry` (None where
        the launch took Triton's path and kept nothing)."""
        key = None if warmup or not self.direct() else self.fast_key(args, kwargs)
        try:
            entry = None if key is None else self.kernels.get(key)
        except TypeError:  # an unhashable option
            entry = key = None
        if entry is not None and not self.globals_changed():
            self.launch_entry(entry, args, grid, kwargs)
            return entry[0], entry
        kernel = self.fn.run(*args, grid=grid, warmup=warmup, **kwargs)
        if hasattr(kernel, "result"):  # (Triton 3.6's asynchronous compile)
            kernel = kernel.result()
        if key is None or kernel is None:
            return kernel, None
        tail = tuple([kwargs[k] if k in kwargs else self.defaults[k] for k in self.names[len(args):]])
        entry = self.kernels[key] = (kernel, tail, key[0])
        return kernel, entry

    def launch_entry(self, entry, args, grid, kwargs, extra=None) -> None:
        """The launch of an entry that :meth:`launch` kept for these arguments' key: ``args`` the
        positional ones, ``kwargs`` (and ``extra``, keywords a wrapper added) for VERIFY."""
        kernel, tail, device = entry
        values = args + tail
        if callable(grid):
            grid = grid(dict(zip(self.names, values)))
        if self.VERIFY:
            self._verify(kernel, device, args, {**kwargs, **(extra or {})}, values)
        stream = driver.active.get_current_stream(device)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        # (an empty HookChain calls nothing: the metadata it would be given, 10 us, is not built)
        hooked = getattr(enter, "calls", enter) or getattr(leave, "calls", leave)
        metadata = kernel.launch_metadata(grid, stream, *values) if hooked else None
        kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                   kernel.function, kernel.packed_metadata, metadata, enter, leave, *values)

    def _verify(self, kernel, device, args, kwargs, values) -> None:
        """That Triton's own binding of this launch picks ``kernel`` and passes ``values`` (the
        positional arguments themselves; the kept constexprs and defaults equal to this launch's)."""
        from triton.runtime.jit import compute_cache_key

        fn = self.fn
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kernel_cache, key_cache, _, _, binder = fn.device_caches[device]
        bound, specialization, options = binder(*args, **kwargs)
        triton_kernel = kernel_cache.get(compute_cache_key(key_cache, specialization, options))
        if hasattr(triton_kernel, "result"):  # (an asynchronous compile's future)
            triton_kernel = triton_kernel.result()
        bound, n = list(bound.values()), len(args)
        if triton_kernel is not kernel or len(bound) != len(values) or \
                any(a is not b for a, b in zip(bound[:n], values[:n])) or \
                any(a is not b and not a == b for a, b in zip(bound[n:], values[n:])):
            raise AssertionError(f"DirectLaunch of {fn.__name__}: Triton's binding picks another kernel or other "
                                 f"arguments ({specialization})")
        DirectLaunch.verified.add(fn.__name__)


class PinnedHeuristics(triton.runtime.Heuristics):
    """``triton.heuristics`` for a pinned launch whose values (the tile, warps, stages, register
    budget) are functions of the constexprs named in ``keys`` alone, which every launch passes
    as keywords: each value is computed once per distinct key, not at every launch. Triton's
    builds the launch's whole argument dict once per value and calls each value: 15-20 us of
    host time a launch on this project's CPU, about half a ``linear`` call's, against under a
    microsecond here. The values run in order, each seeing the ones before it, as Triton's do,
    but on a ``meta`` that holds only ``keys``: a value reading any other argument fails at once
    rather than being held to its first launch's value. A launch whose DirectLaunch key was
    seen launches that key's kernel at once (its picks are in the key, as its keywords)."""

    def __init__(self, fn, keys, values) -> None:
        self.keys = tuple(keys)
        self._picked = {}
        self._direct = {}  # DirectLaunch key of the call's arguments -> (its picks, DirectLaunch's entry)
        self._launch = DirectLaunch(fn)
        super().__init__(fn, fn.arg_names, _Values(values, (self._picked, self._direct)))

    def __getitem__(self, grid):
        return functools.partial(self._run, grid)

    def run(self, *args, grid, warmup=False, **kwargs):
        return self._run(grid, *args, warmup=warmup, **kwargs)

    def _run(self, grid, *args, warmup=False, **kwargs):
        launch = self._launch
        key = None if warmup or not launch.direct() else launch.fast_key(args, kwargs)
        if key is not None:
            try:
                hit = self._direct.get(key)
            except TypeError:  # an unhashable option
                hit = key = None
            if hit is not None and not launch.globals_changed():
                launch.launch_entry(hit[1], args, grid, kwargs, hit[0])
                return hit[1][0]
        try:
            values = tuple(kwargs[k] for k in self.keys)
        except KeyError as e:
            raise TypeError(f"{self.fn.__name__}: pass {e.args[0]} as a keyword (it keys the launch's tile)") from None
        version, picked = self.values.version, self._picked.get(values)
        if picked is None:
            meta, picked = dict(zip(self.keys, values)), {}
            for name, value in self.values.items():
                picked[name] = meta[name] = value(meta)
        kernel, entry = launch.launch(args, {**kwargs, **picked}, grid, warmup)
        if self.values.version == version:  # (no test changed the values meanwhile, on another thread)
            self._picked[values] = picked
            if key is not None and entry is not None:
                self._direct[key] = picked, entry
        return kernel


class _Values(dict):
    """A PinnedHeuristics' values: a change (a test forcing a tile) forgets the picks made so far."""

    def __init__(self, values, picks):
        super().__init__(values)
        self._picks = picks
        self.version = 0

    def _changed(method):
        def call(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            finally:  # after the change: a launch in between cannot keep a pick of the old values
                self.version += 1
                for picks in self._picks:
                    picks.clear()
        return call

    __setitem__, __delitem__ = _changed(dict.__setitem__), _changed(dict.__delitem__)
    update, clear, pop = _changed(dict.update), _changed(dict.clear), _changed(dict.pop)
    popitem, setdefault, __ior__ = _changed(dict.popitem), _changed(dict.setdefault), _changed(dict.__ior__)
    del _changed


def pinned(keys, values):
    """Decorator: ``triton.heuristics(values)`` computed once per value of the constexprs
    ``keys`` (PinnedHeuristics)."""
    return lambda fn: PinnedHeuristics(fn, keys, values)


class TunedLaunch(triton.runtime.Autotuner):
    """``triton.autotune`` whose launches, once their key is tuned, skip the Autotuner's own key
    building: it looks every argument up by name and turns each tensor's dtype into a string at
    every launch (host time a launch of ``linear``'s kernel, on this project's CPU with the launch
    itself stubbed: 12.0-12.7 us through the Autotuner, 6.0 here, 3.5 pinned). The pick is
    remembered under the facts Triton's key holds (the ``key`` arguments' values and the
    arguments' dtypes) with Triton's key itself, and launched directly only while it is still
    what the Autotuner would launch (its cache's entry for that key, or its one config): a new
    key, a cleared cache (a re-tune) or configs replaced (a test forcing a tile) go through the
    Autotuner as before. Once a pick has launched, a launch of the same DirectLaunch key and
    ``key`` values finds its kernel at once. A key first seen inside a CUDA graph capture
    launches a config that fits, untimed (timing would end the capture): one another key picked
    where there is one, else the first."""

    def __init__(self, fn, configs, key, prune_configs_by=None) -> None:
        super().__init__(fn, fn.arg_names, configs, key, None, None, prune_configs_by=prune_configs_by)
        self._key_at = [(name, fn.arg_names.index(name)) for name in key]
        self._picked = {}
        self._direct = {}  # (DirectLaunch key, the key arguments) -> (config, Triton's key, DirectLaunch's entry)
        self._launch = DirectLaunch(fn)

    def _triton_key(self, args, kwargs) -> tuple:
        """Autotuner.run's key for this launch (Triton 3.6-3.8)."""
        named = {name: v for name, v in {**dict(zip(self.arg_names, args)), **kwargs}.items() if name in self.arg_names}
        return tuple([named[k] for k in self.keys if k in named]
                     + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])

    def _current(self, config, triton_key) -> bool:
        """Whether ``config`` is still what the Autotuner launches for ``triton_key``."""
        current = self.cache.get(triton_key) if len(self.configs) > 1 else self.configs[0]
        return current is config and config.pre_hook is None

    def __getitem__(self, grid):
        return functools.partial(self._run, grid)

    def run(self, *args, grid, warmup=False, **kwargs):
        return self._run(grid, *args, warmup=warmup, **kwargs)

    def _run(self, grid, *args, warmup=False, **kwargs):
        launch, n = self._launch, len(args)
        key_values = [args[i] if i < n else kwargs.get(name, _ABSENT) for name, i in self._key_at]
        key = None if warmup or not launch.direct() else launch.fast_key(args, kwargs)
        if key is not None:
            key = (key, *key_values)
            try:
                hit = self._direct.get(key)
            except TypeError:  # an unhashable option
                hit = key = None
            if hit is not None and self._current(hit[0], hit[1]) and not launch.globals_changed():
                self.best_config = hit[0]
                launch.launch_entry(hit[2], args, grid, kwargs, hit[0].all_kwargs() if launch.VERIFY else None)
                return hit[2][0]
        picked_key = tuple(key_values + [a.dtype for a in (*args, *kwargs.values()) if hasattr(a, "dtype")])
        picked = self._picked.get(picked_key)
        # (a keyword of the caller's that the config also sets: the Autotuner refuses the launch)
        if picked is not None and self._current(picked[0], picked[2]) and not picked[1].keys() & kwargs.keys():
            config, config_kwargs, triton_key = picked
            self.best_config = config
            kernel, entry = launch.launch(args, {**kwargs, **config_kwargs}, grid, warmup)
            if key is not None and entry is not None:
                self._direct[key] = config, triton_key, entry
            return kernel
        if not warmup and len(self.configs) > 1 and torch.cuda.is_initialized() and \
                torch.cuda.is_current_stream_capturing():
            triton_key = self._triton_key(args, kwargs)
            if triton_key not in self.cache:
                # a key first seen inside a CUDA graph capture: no timing there (the benchmark
                # synchronises, which ends the capture with an error), a config that fits instead,
                # one another key picked where there is one (compiled, if for these arguments'
                # specialisation: a compile's module load inside a capture fails too), remembered
                # for no later launch (the next one outside a capture tunes)
                self.nargs = dict(zip(self.arg_names, args))
                try:
                    fitting = self.prune_configs(kwargs)
                finally:
                    self.nargs = None
                chosen = set(self.cache.values())
                config = next((c for c in fitting if c in chosen), fitting[0])
                if not config.all_kwargs().keys() & kwargs.keys():  # (else the Autotuner refuses the call)
                    self.best_config = config
                    return launch.launch(args, {**kwargs, **config.all_kwargs()}, grid, warmup)[0]
        out = super().run(*args, grid=grid, warmup=warmup, **kwargs)
        self._picked[picked_key] = (self.best_config, self.best_config.all_kwargs(), self._triton_key(args, kwargs))
        return out


_ABSENT = object()


def tuned(configs, key, prune_configs_by=None):
    """Decorator: ``triton.autotune(configs, key, prune_configs_by)`` whose tuned launches skip
    its per-launch key building (TunedLaunch)."""
    return lambda fn: TunedLaunch(fn, configs, key, prune_configs_by)
