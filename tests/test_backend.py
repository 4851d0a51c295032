"""The backend switch: per thread (a server's inference threads each keep their own), nested,
per op family, and checked."""
import collections
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import mpvit_kernels
from mpvit_kernels import backend, ops
from tests.conftest import KERNEL_DEVICE
from tests.utils import RecordOps, warnings_as_errors


def test_use_backend_in_one_thread_leaves_the_others_alone():
    barrier = threading.Barrier(2, timeout=30)
    seen, errors = {}, []

    def run(name, backend):
        try:
            x, s, t = torch.randn(2, 4, 3, 3), torch.rand(4), torch.randn(4)
            with mpvit_kernels.use_backend(backend) if backend else torch.no_grad():
                barrier.wait()  # both threads inside their block at once
                with RecordOps() as rec:
                    ops.affine_hswish(x, s, t, True)
                seen[name] = (mpvit_kernels.get_backend(), "mpvit_kernels.affine_hswish" in rec.names)
                barrier.wait()
        except Exception as e:  # noqa: BLE001  (reported below, from the test's thread)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=("off", "reference")), threading.Thread(target=run, args=("on", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen["off"] == ("reference", False)
    assert seen["on"] == ("auto", mpvit_kernels.extension_available())


def _in_threads(n, work):
    """work(i) in n threads started together; the exceptions they raised."""
    barrier, errors = threading.Barrier(n, timeout=60), []

    def run(i):
        try:
            barrier.wait()
            work(i)
        except Exception as e:  # noqa: BLE001  (reported by the caller, from the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_tuning_one_kernel_at_once_each_get_their_result(monkeypatch):
    """Every launch holds the process's launch lock (backend.triton_device): Triton's Autotuner
    keeps a launch's arguments on itself while it tunes (a second thread's launch cleared them
    under the first: TypeError), and the interpreter patches triton.language during a launch.
    A two-config kernel, each thread's sizes a new tuning key; the benchmark a stand-in timer
    (the interpreter has none)."""
    import triton
    import triton.language as tl

    from mpvit_kernels import backend

    @triton.autotune([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"])
    @triton.jit
    def add_one(x, y, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + i, tl.load(x + i, mask=i < n) + 1, mask=i < n)

    def timer(fn, quantiles=None, **_):
        fn()
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(type(add_one), "do_bench", property(lambda self: timer), raising=False)

    def work(i):
        for j in range(3):
            n = 40 + 8 * (3 * i + j)
            x = torch.randn(n, device=KERNEL_DEVICE)  # a GPU's launcher refuses CPU tensors
            y = torch.empty_like(x)
            with backend.triton_device(x):
                add_one[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)
            assert torch.equal(y, x + 1)

    errors = _in_threads(6, work)
    assert not errors, errors
    assert len(add_one.cache) == 18  # every key tuned once


def test_pinned_launch_picks_its_tile_once_per_key_from_the_keys_alone():
    """triton.launch.pinned, the ops' pinned launches: each value computed once per
    distinct key (Triton's heuristics recompute every value at every launch), the values in
    order as Triton's, a value reading a launch argument outside the keys refused, and a test
    forcing another value (kernel.values.update) taking effect at the next launch."""
    import triton
    import triton.language as tl

    from mpvit_kernels import backend
    from mpvit_kernels.triton.launch import pinned

    calls = []

    def block(meta):
        calls.append(meta["WIDE"])
        return 32 if meta["WIDE"] else 16

    @pinned(("WIDE",), {"BLOCK": block, "TWICE": lambda meta: 2 * meta["BLOCK"]})
    @triton.jit
    def fill(y, n, WIDE: tl.constexpr, BLOCK: tl.constexpr, TWICE: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + i, i * 0 + BLOCK * 1000 + TWICE, mask=i < n)

    def launch(n, wide):
        y = torch.zeros(n, device=KERNEL_DEVICE, dtype=torch.int32)
        with backend.triton_device(y):
            fill[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](y, n, WIDE=wide)
        return y

    for n, wide in ((40, False), (70, False), (40, True), (99, False), (70, True)):
        y = launch(n, wide)
        block_n = 32 if wide else 16
        assert torch.equal(y.cpu(), torch.full((n,), block_n * 1002, dtype=torch.int32)), (n, wide)
    assert calls == [False, True]  # once per key, whatever the sizes

    saved = dict(fill.values)
    fill.values.update(BLOCK=lambda meta: 64)
    try:
        assert torch.equal(launch(70, False).cpu(), torch.full((70,), 64 * 1002, dtype=torch.int32))
    finally:
        fill.values.clear()
        fill.values.update(saved)
    assert torch.equal(launch(70, False).cpu(), torch.full((70,), 16 * 1002, dtype=torch.int32))

    fill.values["BLOCK"] = lambda meta: 16 if meta["n"] < 50 else 32  # n is not a key: refused
    with pytest.raises(KeyError, match="n"):
        launch(40, False)
    fill.values.update(saved)
    fill.values |= {"BLOCK": lambda meta: 64}  # any way of changing the values is seen
    assert torch.equal(launch(70, False).cpu(), torch.full((70,), 64 * 1002, dtype=torch.int32))
    fill.values.update(saved)
    with pytest.raises(TypeError, match="pass WIDE as a keyword"):
        fill[(1,)](torch.zeros(1, device=KERNEL_DEVICE), 1, False)


def test_tuned_launch_tunes_each_key_once_then_launches_its_pick_directly(monkeypatch):
    """triton.launch.tuned, the ops' autotuned launches: the first launch of a key tunes
    through Triton's Autotuner; later ones launch the remembered pick without it, the config
    Triton's cache holds for that key. A new key value, another dtype, configs replaced (a
    test forcing a tile) or a cleared cache (a re-tune) go through the Autotuner again. The
    timings a stand-in (the interpreter has no timer): the 32-wide tile wins from 64 elements."""
    import triton
    import triton.language as tl

    from mpvit_kernels import backend
    from mpvit_kernels.triton.launch import TunedLaunch, tuned

    benched, tunings = [], []

    def bench(self, *args, config, **meta):
        benched.append((config.kwargs["BLOCK"], args[2]))
        t = 1.0 if (config.kwargs["BLOCK"] == 32) == (args[2] >= 64) else 2.0
        return [t, t, t]

    autotuner_run = triton.runtime.Autotuner.run

    def counted_run(self, *args, **kwargs):
        tunings.append(args[2])
        return autotuner_run(self, *args, **kwargs)

    monkeypatch.setattr(TunedLaunch, "_bench", bench)
    monkeypatch.setattr(triton.runtime.Autotuner, "run", counted_run)

    @tuned([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"])
    @triton.jit
    def fill(x, y, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + i, tl.load(x + i, mask=i < n) * 0 + BLOCK, mask=i < n)

    def launch(n, dtype=torch.float32):
        x = torch.zeros(n, device=KERNEL_DEVICE, dtype=dtype)
        y = torch.zeros_like(x)
        with backend.triton_device(x):
            fill[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)
        return set(y.tolist())

    assert [launch(n) for n in (40, 40, 70, 40, 70)] == [{16}, {16}, {32}, {16}, {32}]
    assert tunings == [40, 70] and len(benched) == 4  # each key tuned once, both configs timed
    assert {k[0]: c.kwargs["BLOCK"] for k, c in fill.cache.items()} == {40: 16, 70: 32}
    assert all(any(c is p for c in fill.cache.values()) for p, *_ in fill._picked.values())
    assert launch(40, torch.float64) == {16} and tunings == [40, 70, 40]  # another dtype: another key
    saved = fill.configs, dict(fill.cache)
    fill.configs = [triton.Config({"BLOCK": 16})]
    fill.cache.clear()
    try:
        assert launch(70) == {16} and tunings[-1] == 70  # forced: the Autotuner again, its one config
    finally:
        fill.configs, fill.cache = saved
    assert launch(70) == {32} and tunings[-1] == 70
    calls = len(tunings)
    assert launch(70) == {32} and len(tunings) == calls  # the pick again, directly
    x = torch.zeros(70, device=KERNEL_DEVICE)
    with backend.triton_device(x), pytest.raises(TypeError, match="multiple values"):
        fill[(1,)](x, torch.zeros_like(x), 70, BLOCK=64)  # a keyword the pick sets: refused, as the Autotuner does
    calls = len(tunings)  # (through the Autotuner, which refused it)
    fill.cache.clear()  # a re-tune asked for: through the Autotuner, which times both configs again
    assert launch(70) == {32} and len(tunings) == calls + 1 and benched[-2:] == [(16, 70), (32, 70)]


def test_threads_call_the_ops_side_by_side():
    """Two op families' Triton kernels (interpreted on CPU here) from threads at once give each
    thread what one thread alone gets."""
    from tests.test_factor_attention import DEFAULT, make_inputs

    torch.manual_seed(0)
    attention = [make_inputs(1, 5, 4, 4, DEFAULT, torch.float32, requires_grad=False) for _ in range(3)]
    maps = [[torch.randn(1, 6, 3, 5) for _ in range(3)] for _ in range(3)]
    weight = torch.randn(7, 18)

    def both(i):
        return ops.factor_attention(*attention[i]), ops.gli_projection(maps[i], weight, hswish=True)

    with torch.no_grad():
        alone = [both(i) for i in range(3)]
        together = [None] * 3
        errors = _in_threads(3, lambda i: together.__setitem__(i, both(i)))
    assert not errors, errors
    for a, b in zip(alone, together):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_threads_share_the_cache_of_derived_weights(monkeypatch):
    """Eval BatchNorm folds and packed weights are cached per tensor version for every thread;
    another thread's eviction between a lookup and its bookkeeping raised KeyError."""
    from mpvit_kernels import backend

    monkeypatch.setattr(backend, "_DERIVED_SIZE", 2)  # evictions all the time
    sources = [torch.randn(3) for _ in range(6)]

    def work(i):
        for j in range(4000):
            t = sources[(i + j) % len(sources)]
            assert torch.equal(backend.cached_by_version((t,), "x2", lambda: t * 2), t * 2)

    errors = _in_threads(4, work)
    backend.clear_caches()
    assert not errors, errors


def test_inference_casts_the_gemm_weights_once_per_weight_version(monkeypatch):
    """gli_projection and dwconv_bn cast a weight of another dtype than the activations (autocast's
    bf16 over fp32 weights on a GPU: a cast launch per op per forward otherwise) once per weight
    version in inference; a weight written in place is cast again; results as uncached."""
    from mpvit_kernels import backend

    casts = []
    cached = backend.cached_by_version
    monkeypatch.setattr(backend, "cached_by_version",
                        lambda sources, extra, compute: cached(sources, extra, lambda: casts.append(extra) or compute()))
    backend.clear_caches()
    maps = [torch.randn(1, 8, 3, 5).to(KERNEL_DEVICE, memory_format=torch.channels_last) for _ in range(2)]
    gli_w = torch.randn(6, 16, 1, 1, dtype=torch.float64, device=KERNEL_DEVICE)
    dw, pw = (torch.randn(shape, dtype=torch.float64, device=KERNEL_DEVICE) for shape in ((8, 1, 3, 3), (6, 8, 1, 1)))
    scale, shift = torch.rand(6, device=KERNEL_DEVICE) + 0.5, torch.randn(6, device=KERNEL_DEVICE)

    def forward():
        return (ops.gli_projection(maps, gli_w, scale, shift, hswish=True),
                ops.dwconv_bn(maps[0], dw, pw, 1, scale, shift, hswish=True))

    with torch.no_grad():
        first = forward()
        assert sorted(map(str, casts)) == ["torch.float32"] * 3  # the GLI weight, dw and pw
        for a, b in zip(forward(), first):
            assert torch.equal(a, b)
        assert len(casts) == 3
        gli_w.mul_(2)
        after = forward()
        assert len(casts) == 4
        with mpvit_kernels.use_backend("reference"):
            want = forward()
    backend.clear_caches()
    for a, b in zip(after, want):  # the GLI with its new weight, not the stale cast
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_use_backend_nests_per_op_family_and_restores():
    assert mpvit_kernels.get_backend() == "auto"
    with mpvit_kernels.use_backend("reference"):
        with mpvit_kernels.use_backend("auto", ops=["depthwise"]):
            assert mpvit_kernels.get_backend("depthwise") == "auto"
            assert mpvit_kernels.get_backend("dwconv_bn") == "reference"
        assert mpvit_kernels.get_backend("depthwise") == "reference"
    assert mpvit_kernels.get_backend("depthwise") == "auto"
    # (an unknown backend or op family: test_affine_hswish's backend test)
    with pytest.raises(TypeError, match="ops"):
        with mpvit_kernels.use_backend("reference", ops="depthwise"):
            pass


def test_meta_tensors_go_through_the_registered_ops():
    # Shapes without data (the traffic counts run the model so): the ops' fakes answer.
    from mpvit_kernels.models import mpvit_tiny

    model = mpvit_tiny(num_classes=7).to("meta").eval()
    with torch.no_grad(), RecordOps() as rec:
        out = model(torch.empty(2, 3, 64, 48, device="meta"))
    assert out.shape == (2, 7) and out.device.type == "meta"
    compiled = ("depthwise", "affine_hswish") if mpvit_kernels.extension_available() else ()
    for op in ("dwconv_bn", "gli_projection", "factor_attention_fwd") + compiled:
        assert f"mpvit_kernels.{op}" in rec.names, op


@pytest.mark.parametrize("capability", [(7, 5), (9, 0)])
def test_gpus_below_compute_capability_8_take_the_reference_under_auto(monkeypatch, capability):
    # no GPU here: the device's answers are stand-ins; what is tested is the decision
    from mpvit_kernels import backend

    props = collections.namedtuple("Props", "major minor")(*capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backend, "_capability", {})
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_extension_cuda", True)  # built with its CUDA kernels, whatever torch is here
    monkeypatch.setattr(backend, "_kernel_image", {0: 0})  # for this GPU
    gpu = torch.device("cuda")
    if capability >= backend.MIN_CAPABILITY:
        assert backend.use_triton("linear", gpu) and backend.use_extension("depthwise", gpu)
        return
    with pytest.warns(RuntimeWarning, match=r"cuda:0 has compute capability 7\.5; .* 8\.0 or newer") as warned:
        assert not backend.use_triton("linear", gpu)
        assert not backend.use_extension("depthwise", gpu) and not backend.use_triton("factor_attention", gpu)
    assert len(warned) == 1  # once per device
    # under torch.compile the same decision, without the warning (which would break the graph)
    monkeypatch.setattr(backend, "_capability", {})
    monkeypatch.setattr(backend, "_warned", set())
    decide = torch.compile(lambda x: x + backend.use_triton("linear", gpu), backend="eager", fullgraph=True)
    with warnings_as_errors():
        assert decide(torch.zeros(1)).item() == 0
    for forced, ask in (("triton", backend.use_triton), ("cuda", backend.use_extension)):
        with mpvit_kernels.use_backend(forced), pytest.raises(RuntimeError, match=f"backend '{forced}' asked .* 7\\.5"):
            ask("gli_projection", gpu)
    # a CPU tensor's kernels are untouched by the GPU's age
    assert backend.use_extension("depthwise", torch.device("cpu"))


def test_compiled_graphs_follow_the_switch_where_dynamo_cannot_read_a_contextvar(monkeypatch):
    # Dynamo before torch 2.14 (the GPU image has 2.11) stops a fullgraph trace at
    # ContextVar.get: there graphs read use_backend's process-wide copy of the switch, guarded as
    # a global. Emulated here by a switch whose get no trace may call.
    from mpvit_kernels import backend

    class Untraceable:
        def __init__(self, var):
            self.var = var
            self.get = torch.compiler.disable(var.get)

        def set(self, value):
            return self.var.set(value)

        def reset(self, token):
            self.var.reset(token)

    monkeypatch.setattr(backend, "_FORCED", Untraceable(backend._FORCED))
    x = torch.zeros(1)

    def picks_reference(x):
        return x + (backend.get_backend("depthwise") == "reference")

    monkeypatch.setattr(backend, "_DYNAMO_READS_CONTEXTVARS", True)
    with pytest.raises(torch._dynamo.exc.Unsupported):  # the control: the variable itself
        torch.compile(picks_reference, backend="eager", fullgraph=True)(x)
    monkeypatch.setattr(backend, "_DYNAMO_READS_CONTEXTVARS", False)
    compiled = torch.compile(picks_reference, backend="eager", fullgraph=True)
    assert compiled(x).item() == 0
    with mpvit_kernels.use_backend("reference"):
        assert compiled(x).item() == 1
        with mpvit_kernels.use_backend("auto", ops=["depthwise"]):
            assert compiled(x).item() == 0
        assert compiled(x).item() == 1
    with mpvit_kernels.use_backend("reference", ops=["linear"]):
        assert compiled(x).item() == 0
    assert compiled(x).item() == 0 and backend._forced_for_graphs == (None, {})


def test_an_extension_built_without_cuda_kernels_leaves_gpu_tensors_to_the_reference(monkeypatch):
    # A build without nvcc holds the CPU twins alone: on a GPU, auto runs the reference (one
    # warning), the cuda backend says why it cannot, CPU tensors keep the twins. Stand-in
    # device answers: no GPU here.
    from mpvit_kernels import backend

    monkeypatch.setattr(backend, "_capability", {0: (9, 0)})  # a GPU the kernels take
    monkeypatch.setattr(backend, "_kernel_image", {0: 0})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backend, "_warned", set())
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(backend, "_extension_cuda", True)
    assert backend.use_extension("depthwise", gpu) and backend.extension_runs_on(gpu)
    monkeypatch.setattr(backend, "_extension_cuda", False)
    with pytest.warns(RuntimeWarning, match="built without its CUDA kernels") as warned:
        assert not backend.use_extension("depthwise", gpu) and not backend.use_extension("affine_hswish", gpu)
    assert len(warned) == 1
    assert not backend.extension_runs_on(gpu)  # what the fused ops' backward asks
    assert backend.use_extension("depthwise", cpu) and backend.extension_runs_on(cpu)
    with mpvit_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="'depthwise' has no kernel for CUDA"):
        backend.use_extension("depthwise", gpu)


def test_an_extension_built_for_other_gpus_leaves_its_ops_to_the_reference(monkeypatch):
    # Built for other archs without PTX for this GPU (TORCH_CUDA_ARCH_LIST=8.0 on a 10.0 part):
    # every launch would fail with "no kernel image is available". Stand-in device answers: no
    # GPU here; on one, test_affine_hswish asks the real query.
    from mpvit_kernels import backend

    props = collections.namedtuple("Props", "major minor")(10, 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backend, "_capability", {})
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_extension_cuda", True)
    monkeypatch.setattr(backend, "_kernel_image", {})
    asked = []
    monkeypatch.setattr(backend, "_find_kernel_image", lambda index: asked.append(index) or 209)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    # under torch.compile before any eager call asked: the query cannot run in a graph, the kernels are assumed
    decide = torch.compile(lambda x: x + backend.use_extension("depthwise", gpu), backend="eager", fullgraph=True)
    assert decide(torch.zeros(1)).item() == 1 and asked == []
    with pytest.warns(RuntimeWarning, match=r"no code that runs on cuda:0 \(compute capability 10\.0; CUDA error "
                                            r"209") as warned:
        assert not backend.use_extension("depthwise", gpu) and not backend.use_extension("affine_hswish", gpu)
        assert not backend.extension_runs_on(gpu)  # what the fused ops' backward asks
    assert len(warned) == 1 and asked == [0]  # asked and warned once per device
    assert backend.use_triton("linear", gpu)  # Triton compiles for the GPU it runs on
    assert backend.use_extension("depthwise", cpu) and backend.extension_runs_on(cpu)
    with mpvit_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="'depthwise', but .* no code that runs"):
        backend.use_extension("depthwise", gpu)
    monkeypatch.setattr(backend, "_kernel_image", {})
    monkeypatch.setattr(backend, "_find_kernel_image", lambda index: 0)  # a build with code for it
    assert backend.use_extension("depthwise", gpu) and backend.extension_runs_on(gpu)


def test_the_cuda_build_answers_whether_its_kernels_load_on_a_gpu():
    from mpvit_kernels import backend

    if not (mpvit_kernels.extension_available() and backend._extension_cuda):
        pytest.skip("mpvit_kernels._C built without CUDA kernels")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mpvit_kernels::cuda_kernel_image", "CUDA")
    if not torch.cuda.is_available():
        return
    # built for this GPU (make gpu-proof builds for it): found, and the query leaves no error
    # behind for the next launch's check
    assert torch.ops.mpvit_kernels.cuda_kernel_image(torch.empty(0, device="cuda")) == 0
    x = torch.randn(2, 3, 4, 5, device="cuda")
    y = torch.ops.mpvit_kernels.affine_hswish(x, torch.ones(3, device="cuda"), torch.zeros(3, device="cuda"), False)
    torch.testing.assert_close(y, x)


def _recorded_by(t: torch.Tensor) -> str:
    """The autograd node of the op that made ``t``, under the views and casts the op wrappers add."""
    node = t.grad_fn
    while type(node).__name__.startswith(("View", "Reshape", "Permute", "Alias", "Unsafe", "Transpose")):
        node = node.next_functions[0][0]
    return type(node).__name__


@pytest.mark.skipif(not mpvit_kernels.extension_available(), reason="needs the compiled extension")
def test_eager_code_calls_an_extension_op_below_autograd_and_anything_else_through_it(monkeypatch):
    # backend.call_op on a C++ op of ours: below the autograd keys where no graph is recorded
    # (what the op's registered autograd would do itself, minus its Python); where one is, on
    # call_op's own autograd node with the op's formula, the op still below the autograd keys,
    # and so its backward op; under a dispatch mode, the whole op
    from mpvit_kernels import backend

    entered = []

    class Below:
        def __enter__(self):
            entered.append(1)
            self.guard = torch._C._AutoDispatchBelowAutograd()
            return self.guard.__enter__()

        def __exit__(self, *exc):
            return self.guard.__exit__(*exc)

    monkeypatch.setattr(backend, "_BELOW_AUTOGRAD", Below)
    x = torch.randn(2, 6, 5, 7, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 1, 3, 3, device=KERNEL_DEVICE, requires_grad=True)
    b = torch.randn(6, device=KERNEL_DEVICE, requires_grad=True)
    with mpvit_kernels.use_backend("cuda", ops=["depthwise"]):
        with torch.no_grad():
            y_below = ops.depthwise(x, w, b, residual=True)
        assert len(entered) == 1 and not y_below.requires_grad
        y = ops.depthwise(x, w, b, residual=True)  # w and b take grads: autograd records the op
        assert len(entered) == 2 and _recorded_by(y) == "_EagerAutogradBackward"
        assert torch.equal(y_below, y.detach())
        grads = torch.autograd.grad(y.square().sum(), (w, b))
        assert len(entered) == 3  # depthwise_backward
        monkeypatch.setattr(backend, "_AUTOGRAD", {})  # no formula for call_op: the registered op's autograd
        y_registered = ops.depthwise(x, w, b, residual=True)
        assert len(entered) == 3 and _recorded_by(y_registered).startswith("GeneratedBackward")
        for got, want in zip(grads, torch.autograd.grad(y_registered.square().sum(), (w, b))):
            assert torch.equal(got, want)
        assert len(entered) == 4  # the same backward, its op below autograd
        with torch.no_grad(), RecordOps() as rec:  # a dispatch mode sees the op
            ops.depthwise(x, w, b, residual=True)
        assert len(entered) == 4 and "mpvit_kernels.depthwise" in rec.names


def test_eager_code_calls_the_implementations_straight_and_anything_else_the_registered_op(monkeypatch):
    # backend.call_op skips the registered op's Python layers (a quarter of a linear call's host
    # time) only where nothing needs the dispatcher; the same function runs either way, and where
    # autograd records the op, the same formula (its setup_context and backward) on call_op's node.
    import importlib

    from mpvit_kernels import backend

    linear_module = importlib.import_module("mpvit_kernels.ops.linear")
    op = linear_module._linear
    direct = []
    implementation = op._init_fn
    monkeypatch.setattr(op, "_init_fn", lambda *a: direct.append(1) or implementation(*a))
    x = torch.randn(2, 5, 16, device=KERNEL_DEVICE)
    w = torch.randn(24, 16, device=KERNEL_DEVICE, requires_grad=True)
    b, lw, lb = (torch.randn(n, device=KERNEL_DEVICE) for n in (24, 16, 16))

    def run():
        direct.clear()
        y = ops.linear(x, w, b, lw, lb, 1e-6)
        return y, bool(direct)

    with torch.no_grad():
        y_direct, took = run()
    assert took
    y_eager, took = run()  # w requires grad: autograd records the op, on call_op's node
    assert took and _recorded_by(y_eager) == "_EagerAutogradBackward"
    with monkeypatch.context() as m:
        m.setattr(backend, "_AUTOGRAD", {})  # no formula for call_op: the registered op
        y_registered, took = run()
    assert not took and y_registered.requires_grad
    assert torch.equal(y_direct, y_eager.detach()) and torch.equal(y_direct, y_registered.detach())
    seed = torch.randn_like(y_direct)
    assert torch.equal(*(torch.autograd.grad(y, w, seed)[0] for y in (y_eager, y_registered)))
    with torch.no_grad(), RecordOps() as rec:  # a dispatch mode sees every op
        assert not run()[1]
    assert "mpvit_kernels.linear" in rec.names
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert not run()[1]  # a profile names the op
    assert any("mpvit_kernels::linear" in e.key for e in prof.key_averages())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace is deprecated, and warns of the checks' Python bools
        frozen = w.detach()
        traced = torch.jit.trace(lambda t: ops.linear(t, frozen, b, lw, lb, 1e-6), (x,), check_trace=False)
    assert "mpvit_kernels::linear" in str(traced.graph)  # a trace records the op, not its insides
    with torch.no_grad():
        meta = [t.to("meta") for t in (x, w, b, lw, lb)]
        direct.clear()
        assert ops.linear(*meta, 1e-6).device.type == "meta" and not direct  # the fake answers


@pytest.mark.parametrize("wanted", ["all", "inputs[1] and bn_bias"])
def test_call_ops_autograd_node_passes_tensor_lists_flat_and_gives_the_registered_ops_grads(monkeypatch, wanted):
    # gli_projection_train takes a list of maps: call_op's node sees each map, asks the backward
    # for the grads that are needed (needs_input_grad regrouped as the op's inputs) and gives each
    # map its own; bitwise the registered op's grads, running statistics too
    from mpvit_kernels import backend

    torch.manual_seed(0)
    inputs = [torch.randn(2, 6, 5, 3, dtype=torch.float64, device=KERNEL_DEVICE)
              .contiguous(memory_format=torch.channels_last) for _ in range(3)]
    weight = torch.randn(7, 18, 1, 1, dtype=torch.float64, device=KERNEL_DEVICE)
    gamma = torch.rand(7, dtype=torch.float64, device=KERNEL_DEVICE) + 0.5
    beta = torch.randn(7, dtype=torch.float64, device=KERNEL_DEVICE)
    leaves = [*inputs, weight, gamma, beta] if wanted == "all" else [inputs[1], beta]
    seen = []

    def step():
        xs = [t.detach().requires_grad_(any(t is leaf for leaf in leaves)) for t in inputs]
        params = [t.detach().requires_grad_(any(t is leaf for leaf in leaves)) for t in (weight, gamma, beta)]
        y, mean, var = ops.gli_projection_train(xs, params[0], params[1], params[2], 1e-5, hswish=True)
        seen.append(_recorded_by(y))
        want = [t for t in (*xs, *params) if t.requires_grad]
        return (y, mean, var), torch.autograd.grad(y.square().sum(), want)

    with mpvit_kernels.use_backend("triton"):  # (interpreted on a CPU)
        eager = step()
        monkeypatch.setattr(backend, "_AUTOGRAD", {})
        registered = step()
    assert seen[0] == "_EagerAutogradBackward" and seen[1].startswith("GeneratedBackward"), seen  # torch.library's
    assert len(eager[1]) == len(leaves)
    for got, want in zip((*eager[0], *eager[1]), (*registered[0], *registered[1])):
        assert torch.equal(got, want)


def test_a_cuda_graph_capture_computes_derived_weights_afresh_and_keeps_none(monkeypatch):
    """Inside a capture a cached fold, packing or cast would be a tensor the cache may free or
    replace while the graph reads it, and blind to in-place changes: cached_by_version computes it
    afresh there (in the graph) and keeps nothing; the eager entry stays. (The capture itself is
    stood in for here; test_autocast's CUDA test captures a real one.)"""
    from mpvit_kernels import backend

    backend.clear_caches()
    t, computed = torch.randn(4), []

    def compute():
        computed.append(1)
        return t * 2

    eager = backend.cached_by_version((t,), "x2", compute)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    captured = [backend.cached_by_version((t,), "x2", compute) for _ in range(2)]
    entries = len(backend._DERIVED)
    monkeypatch.undo()
    assert len(computed) == 3 and entries == 1 and all(c is not eager for c in captured)
    assert backend.cached_by_version((t,), "x2", compute) is eager and len(computed) == 3
    backend.clear_caches()


def test_a_derived_weight_read_on_another_cuda_stream_waits_for_it_and_holds_its_memory(monkeypatch):
    """One value for every stream: a stream other than the one that made it waits for the event
    recorded after its computation, and records its use of the value's memory (record_stream),
    once; without either, it could be read before it was complete, or reused while that stream
    still read it. Streams and events stood in for here; the CUDA test below uses real ones."""
    from mpvit_kernels import backend

    backend.clear_caches()
    stream, shared = [7], []
    monkeypatch.setattr(backend, "current_stream", lambda device: stream[0])
    monkeypatch.setattr(backend, "_made_on_stream", lambda device: ["event", {stream[0]}])
    monkeypatch.setattr(backend, "_share_with_current_stream",
                        lambda value, streams, device: shared.append(streams[0]) or streams[1].add(stream[0]))

    class OnCuda(torch.Tensor):
        is_cuda = True

    t = torch.randn(4).as_subclass(OnCuda)
    first = backend.cached_by_version((t,), "x2", lambda: t * 2)
    assert backend.cached_by_version((t,), "x2", lambda: t * 3) is first and shared == []  # its own stream
    stream[0] = 9
    for _ in range(2):
        assert backend.cached_by_version((t,), "x2", lambda: t * 3) is first
    assert shared == ["event"] and len(backend._DERIVED) == 1  # waited and recorded once
    t.mul_(3)  # a new version: made again, on the stream that asks, which may read it at once
    again = backend.cached_by_version((t,), "x2", lambda: t * 2)
    assert again is not first and torch.equal(again, t * 2) and shared == ["event"]
    backend.clear_caches()


@pytest.mark.cuda
def test_eval_batchnorm_folds_are_shared_with_a_side_stream():
    """The real streams: a fold made on the default stream is read on a side stream after waiting
    for it (and its memory recorded as that stream's), the same tensors, the same results."""
    from mpvit_kernels import backend
    from mpvit_kernels.nn import folded_bn
    from tests.utils import randomize_bn

    backend.clear_caches()
    conv = randomize_bn(mpvit_kernels.Conv2dBN(8, 8, 1, 1, hswish=True)).cuda().eval()
    x = torch.randn(2, 8, 9, 7, device="cuda").to(memory_format=torch.channels_last)
    side = torch.cuda.Stream()
    with torch.no_grad():
        main_fold, want = folded_bn(conv.bn), conv(x)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            side_fold, got = folded_bn(conv.bn), conv(x)
        torch.cuda.current_stream().wait_stream(side)
        entry = next(e for e in backend._DERIVED.values() if e[2] is main_fold)
        assert side_fold[0] is main_fold[0] and side.stream_id in entry[3][1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    backend.clear_caches()


def test_the_cache_lets_deleted_sources_and_their_values_go():
    """An entry holds weak references to its sources: a deleted model's folds, packings and casts
    are freed with it (the cache held them, and the model's tensors, until 512 newer entries
    evicted them: 120 MB after 12 MPViT-T under bf16 autocast). Where the last reference goes
    while the cache's lock is held, the entry goes at the next call."""
    import gc
    import weakref

    from mpvit_kernels import backend

    backend.clear_caches()
    t = torch.randn(4)
    source, value = weakref.ref(t), weakref.ref(backend.cached_by_version((t, None), "x2", lambda s=t: s * 2))
    assert value() is not None and len(backend._DERIVED) == 1
    del t
    gc.collect()
    assert source() is None and value() is None and not backend._DERIVED
    t, kept = torch.randn(4), torch.randn(3)
    backend.cached_by_version((t,), "x2", lambda s=t: s * 2)
    with backend._DERIVED_LOCK:
        del t
    assert len(backend._DERIVED) == 1 and len(backend._FREED) == 1
    backend.cached_by_version((kept,), "x2", lambda: kept * 2)
    assert not backend._FREED and [r() for r in next(iter(backend._DERIVED.values()))[0]] == [kept]
    backend.clear_caches()


def test_derived_weights_under_vmap_fake_mode_and_with_a_frozen_batchnorm():
    """Not cached where the sources are not this eager run's plain tensors: vmap's batched
    parameters (an ensemble, torch.func.stack_module_state) have no storage, and a FakeTensorMode
    run (memory estimators) kept fake folds for the real parameters, which the next eager call
    returned. A BatchNorm look-alike without num_batches_tracked (FrozenBatchNorm2d) folds too."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call, stack_module_state

    from mpvit_kernels import backend
    from mpvit_kernels.nn import folded_bn
    from tests.utils import randomize_bn

    backend.clear_caches()
    convs = [randomize_bn(mpvit_kernels.Conv2dBN(3, 8, 3, 1, hswish=True)).eval() for _ in range(3)]
    x = torch.randn(2, 3, 9, 7)
    params, buffers = stack_module_state(convs)
    with torch.no_grad():
        got = torch.vmap(lambda p, b: functional_call(convs[0], (p, b), (x,)))(params, buffers)
        want = torch.stack([c(x) for c in convs])
        torch.testing.assert_close(got, want)
        backend.clear_caches()
        with FakeTensorMode(allow_non_fake_inputs=True):
            convs[1](x)
        assert type(convs[1](x)) is torch.Tensor

        class FrozenBatchNorm2d(torch.nn.Module):  # as torchvision's: buffers, no num_batches_tracked
            def __init__(self, bn):
                super().__init__()
                self.eps = bn.eps
                for name in ("weight", "bias", "running_mean", "running_var"):
                    self.register_buffer(name, getattr(bn, name).detach().clone())

        for _ in range(2):  # computed, then from the cache
            for a, b in zip(folded_bn(FrozenBatchNorm2d(convs[2].bn)), folded_bn(convs[2].bn)):
                torch.testing.assert_close(a, b)
    backend.clear_caches()


def test_import_leaves_dynamo_unimported_and_marks_the_onnx_flag_as_dynamo_would():
    # Dynamo took 1.3 s of `import mpvit_kernels` (on top of torch's own 1.5 s) for one decorator
    code = "import sys, mpvit_kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    # our mark is the one the public decorator sets: a strict export's trace folds the flag
    import torch._dynamo  # noqa: F401

    def marks(decorate):
        fn = lambda: False  # noqa: E731
        decorate(fn)
        return vars(fn)

    assert backend._in_onnx_export._dynamo_marked_constant is True
    assert marks(torch.compiler.assume_constant_result) == {"_dynamo_marked_constant": True}
    saved = sys.modules.pop("torch._dynamo")
    try:  # the branch an import without Dynamo takes
        assert marks(backend._assume_constant_result) == {"_dynamo_marked_constant": True}
    finally:
        sys.modules["torch._dynamo"] = saved
