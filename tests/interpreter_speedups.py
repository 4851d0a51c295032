"""Test-only: shortcuts in Triton 3.8's interpreter that leave what it computes unchanged (the
19x19 attention case: 10.4 -> 7.8 s with the first two when they came; the third, measured back
to back a session later, 8.3 -> 5.8 s; the fourth, test_factor_attention, test_gli_projection and
test_dwconv_bn in one process, alternating runs: 87.6 -> 77.0 s and 105.4 -> 90.9 s; the rest, an
MHCA encoder's training step on 2 x 32 x 13 x 14, best of 5 in alternating runs: 6.4 -> 4.9 s).

- A ``@triton.jit`` helper called inside a kernel re-patches ``triton.language`` on every call
  (``inspect.getmembers`` over four namespaces, about 1 ms), although the launch that runs it
  patched the same namespaces with the same functions before its first program and restores them
  after its last. Here a helper skips that when the launch has patched every namespace it sees.
- ``_get_np_dtype`` builds a 19-entry dict of dtypes per call (hundreds of thousands of calls a
  test); here its answers are kept per dtype.
- Every int32 ``+``, ``-`` and ``*`` also computes its overflow check (both operands cast to
  int64, the op, two compares), which ``device_assert`` then drops: it checks only under
  ``options.debug``, which the interpreter's builder never sets. A GPU compile without debug
  drops the check the same way. Here the builder is told not to build it (where debug is off).
- Every op's result builds its block type (the shape unwrapped and validated, a name formatted)
  and a ``tl.tensor`` whose ``shape`` is a fresh ``tl.tuple`` of constexprs (a tuple type built
  per element): a few microseconds each, millions of times a test file. Here a block type is
  built once per (element type, shape) and a tensor takes its shape and numel from its type,
  where they were built once (a scalar's: one empty tuple). Types and shapes are never changed
  after they are built, so sharing them is safe; a block type keeps the very element type
  object it was asked for.
- Every binary op broadcasts its operands to a common shape: for two blocks of one shape Triton
  still compares the shapes through ``tl.tuple`` equality and broadcasts each to its own shape
  (a numpy view of the same values). Here such operands, and two scalars, are returned as they
  are, which is what that comes to.
- Every binary op works out its result type from the operands' element types and scalar-ness
  (a pure function of the five arguments): here each answer is kept.
- A block type is built afresh wherever an op needs one (its shape validated, its name
  formatted): here one built from the same element type and shape lends its attributes.
- ``tl.tuple`` equality (block shapes are tl.tuples) wraps a plain list or tuple in a new
  tl.tuple first; here the values are compared directly.
- A launch lists every member of four namespaces (``inspect.getmembers``) to find the builtins
  it patches; here each namespace's builtins are listed once.

Installed by conftest when the kernels run interpreted, on Triton 3.8 only (the code it wraps
is that version's); with another Triton nothing is changed and the tests run at its own speed.
"""
import dataclasses
import inspect
import threading


def install() -> bool:
    try:
        import triton
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    np_dtype = getattr(interpreter, "_get_np_dtype", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    grid_call = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    if (not triton.__version__.startswith("3.8.") or None in (patch_lang, np_dtype, scope_type, grid_call)
            or getattr(grid_call, "memoised", False)):
        return False
    running = threading.local()  # .launches: per launch running now, the ids of the modules it patched (None before)

    def launch(self, *args, **kwargs):
        launches = running.__dict__.setdefault("launches", [])
        launches.append([None])
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launches.pop()

    seen_langs = {}  # per helper: which of the two namespaces its globals hold (scanned once, not per call)

    def patch_lang_once(fn):
        langs = seen_langs.get(fn)
        if langs is None:
            langs = seen_langs[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                               if inspect.ismodule(v) and (v is tl or v is tl.core))
        launches = getattr(running, "launches", None)
        if launches:
            patched = launches[-1]
            if patched[0] is None:  # the launch's own patching, restored when its grid is done
                patched[0] = langs
            elif langs and langs <= patched[0]:  # a helper inside it: nothing left to patch
                return scope_type()  # (none seeing triton.language goes on to Triton's error)
            else:  # a helper that sees another namespace (triton.language.core): patched from now on
                patched[0] = patched[0] | langs
        return patch_lang(fn)

    dtypes = {}

    def np_dtype_once(tt_dtype):
        # a block's numpy dtype is its element's; blocks and pointers are unhashable, and a pointer
        # returns before the dict is built
        key = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(key, tl.pointer_type):
            return np_dtype(key)
        found = dtypes.get(key)
        if found is None:
            found = dtypes[key] = np_dtype(key)
        return found

    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if dataclasses.is_dataclass(options) and not options.debug and getattr(options, "sanitize_overflow", False):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)

    # (id(element type), shape) -> the first block type built so: ops that ask for one
    # (block_type_once) get it, constructors elsewhere in Triton a copy of its attributes
    # (block_type_init_once). It keeps its element type alive, so the id stays that type's own.
    built = {}
    block_type = tl.block_type
    block_type_init = block_type.__init__

    def block_type_init_once(self, element_ty, shape):
        key = None
        if type(shape) in (list, tuple) and all(type(d) is int for d in shape):
            key = (id(element_ty), tuple(shape))
            found = built.get(key)
            if found is not None:
                self.__dict__.update(found.__dict__)
                return
        block_type_init(self, element_ty, shape)
        if key is not None:
            if len(built) > 4096:  # pointer types are built per launch
                built.clear()
            built[key] = self

    def block_type_once(element_ty, shape: tuple):
        found = built.get((id(element_ty), shape))
        # (a new one enters ``built`` as it is built)
        return block_type(element_ty, list(shape)) if found is None else found

    def with_element_ty(self, scalar_ty):
        # (the key a plain tuple of ints: a tl.tuple key hashes alike but compares slowly)
        return block_type_once(scalar_ty, tuple(self.shape.values))

    def get_block_ty(self, dtype, shape):
        if all(type(d) is int for d in shape):
            return block_type_once(dtype, tuple(shape))
        return block_type(dtype, shape)

    constexpr, tl_tuple = tl.constexpr, tl.tuple
    one, no_shape = constexpr(1), tl_tuple([])

    def tensor_init(self, handle, type):
        self.handle = handle
        self.type = type
        self.dtype = type.scalar
        if type.is_block():
            shape = type.__dict__.get("_tensor_shape")
            if shape is None:  # as tl.tensor.__init__ builds them
                shape = type._tensor_shape = (constexpr(type.numel), tl_tuple([constexpr(d) for d in type.shape]))
            self.numel, self.shape = shape
        else:
            self.numel, self.shape = one, no_shape

    semantic = getattr(interpreter, "TritonSemantic", None)
    broadcast_value = getattr(semantic, "broadcast_impl_value", None)
    computation_type = getattr(semantic, "computation_type_impl", None)
    if broadcast_value is not None:
        def broadcast_value_unless_same_shape(self, lhs, rhs):
            lhs_ty, rhs_ty = lhs.type, rhs.type
            if lhs_ty is rhs_ty or (lhs_ty.is_block() and rhs_ty.is_block() and lhs_ty.shape.values == rhs_ty.shape.values):
                return lhs, rhs  # (what Triton's returns: two scalars, or the same blocks broadcast to their shape)
            return broadcast_value(self, lhs, rhs)

        semantic.broadcast_impl_value = broadcast_value_unless_same_shape
    if computation_type is not None:
        promoted = {}

        def computation_type_once(self, a_ty, a_is_scalar, b_ty, b_is_scalar, div_or_mod):
            key = (a_ty, a_is_scalar, b_ty, b_is_scalar, div_or_mod)
            found = promoted.get(key)
            if found is None:  # (a pair it refuses raises each time: never kept)
                found = promoted[key] = computation_type(self, a_ty, a_is_scalar, b_ty, b_is_scalar, div_or_mod)
            return found

        semantic.computation_type_impl = computation_type_once

    block_type.__init__ = block_type_init_once
    tuple_eq = tl_tuple.__eq__

    def tuple_eq_plain(self, other):
        # what _normalize_tuple makes of a tl.tuple, list or tuple, without building a tl.tuple
        kind = type(other)
        if kind is tl_tuple:
            return constexpr(self.values == other.values)
        if kind is list or kind is tuple:
            return constexpr(self.values == list(other))
        return tuple_eq(self, other)

    tl_tuple.__eq__ = tuple_eq_plain
    patch_builtin = getattr(interpreter, "_patch_builtin", None)
    patch_attr = getattr(interpreter, "_patch_attr", None)
    if patch_builtin is not None and patch_attr is not None:
        builtins_of = {}  # namespace -> its builtins (name, function), as inspect.getmembers lists them

        def patch_builtin_once(pkg, builder, scope):
            members = builtins_of.get(pkg)
            if members is None:
                members = [(n, m) for n, m in inspect.getmembers(pkg) if tl.core.is_builtin(m)]
                if not members:  # a namespace patched already (inside a launch): asked again later
                    return
                builtins_of[pkg] = members
            for name, member in members:
                patch_attr(pkg, name, member, builder, scope)

        interpreter._patch_builtin = patch_builtin_once

    launch.memoised = True
    interpreter.GridExecutor.__call__ = launch
    interpreter._patch_lang = patch_lang_once
    interpreter._get_np_dtype = np_dtype_once
    block_type.with_element_ty = with_element_ty
    interpreter.InterpreterBuilder.get_block_ty = get_block_ty
    tl.tensor.__init__ = tensor_init
    return True
