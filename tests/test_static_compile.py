"""Every Triton kernel compiles ahead of time for sm_80 and sm_90a on this CPU machine, for every
autotune config and constexpr combination the ops can launch at the model's shapes, with no
spill (STACK or LOCAL bytes in cuobjdump's resource usage), within the per-block shared-memory
limit and with one block's registers (per thread x threads) within an SM's; the kernels told
their alignment (VEC) read 16 bytes at a time as MPViT launches them; no launchable kernel lacks
a compile spec; the CUDA kernels of the extension likewise; and every launch of an MPViT-T
bf16 step, through Triton's own launch path (tools/launch_check.py), compiles for sm_90 and
binds its arguments as the ops pass them.
The table: benchmarks/results/static/resource_usage.md, its rows in resource_usage.json
(`make static-report`). A cold compile of all of them costs about 10 CPU minutes, more than the
rest of the suite: CI checks the committed rows against the sources and compiles a sample again
(static_compile --check)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "static" / "resource_usage.json"


def _skip_unless_rows_are_for_this_triton():
    import triton

    from mpvit_kernels.triton.static_compile import source_fingerprint

    committed = json.loads(REPORT.read_text())
    # stale rows are stale whatever the Triton
    assert committed["sources"] == source_fingerprint(), "run `make static-report` and commit what it writes"
    if committed["triton"] != triton.__version__:
        # its rows cannot be compared, and a full compile takes 10 CPU minutes and reports what this
        # Triton compiles (Triton 3.9: seven fp32/fp64 compiles spill on sm_90): `make static-report`
        pytest.skip(f"the committed rows are for triton {committed['triton']}, this is {triton.__version__}: "
                    f"`python -m mpvit_kernels.triton.static_compile --check {REPORT}` compiles every kernel with it")


def _check(path):
    # outside the interpreter, which narrows the kernels' autotune lists (what the specs read) to one config
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "mpvit_kernels.triton.static_compile", "--check", str(path)],
                          env=env, capture_output=True, text=True, timeout=1500)


def test_every_kernel_compiles_for_sm80_and_sm90a_without_spills():
    _skip_unless_rows_are_for_this_triton()
    out = _check(REPORT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.strip().endswith(": ok") and "compiled again" in out.stderr


def test_problems_names_each_failing_row():
    from mpvit_kernels.triton.static_compile import Usage, problems

    def row(kernel="k", tag="fp16 VEC=8 aligned", arch=80, **fields):
        return Usage(kernel, tag, "warps=4", arch, **{"registers": 32, "shared": 0, "warps_per_sm": 64,
                                                      "widest_load": 16, **fields})

    clean = [row(arch=a, tag=t) for a in (80, 90) for t in ("fp16 VEC=8 aligned", "fp32")] * 26
    clean.append(row("gli_gemm_kernel", "bf16 TMA", 90, scratch=128))
    assert problems(clean, []) == []
    for bad, words in ((row(spill_bytes=8), "8 B of spills"), (row(error="boom"), "compile error boom"),
                       (row(shared=200 * 1024), "shared memory"), (row(warps_per_sm=0), "no block fits"),
                       (row(widest_load=4), "widest load 4 B"), (row(scratch=64), "global scratch")):
        found = problems(clean + [bad], [])
        assert len(found) == 1 and words in found[0], (bad, found)
    assert "without a compile spec" in problems(clean, ["m.kernel"])[0]


def test_check_refuses_rows_of_other_sources_or_other_figures(tmp_path):
    from mpvit_kernels.triton import static_compile

    committed = json.loads(REPORT.read_text())
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({**committed, "sources": "0" * 64}))
    assert "make static-report" in static_compile.check_committed(str(stale))[0]
    _skip_unless_rows_are_for_this_triton()
    # one register more in the row the sample compiles again (linear_kernel's heaviest on sm_90)
    rows = committed["kernels"]
    heaviest = max((r for r in rows if r["kernel"] == "linear_kernel" and r["arch"] == 90),
                   key=lambda r: (r["registers"], r["shared"]))
    heaviest["registers"] += 1
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(committed))
    out = _check(tampered)
    assert out.returncode == 1 and "linear_kernel" in out.stdout and "compiles unlike" in out.stdout, out.stdout


def test_tensor_core_instructions_read_off_the_ptx():
    from mpvit_kernels.triton.static_compile import Usage, mma_summary, tensor_core_instructions

    assert tensor_core_instructions("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...}") == "wgmma"
    assert tensor_core_instructions("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == "mma.sync"
    assert tensor_core_instructions("fma.rn.f32 %f1, %f2, %f3, %f4;") == "-"
    rows = [Usage("k", "bf16 a", "warps=8", 90, mma="mma.sync"), Usage("k", "bf16 a", "warps=8", 80, mma="mma.sync"),
            Usage("g", "bf16", "warps=8", 90, mma="wgmma"), Usage("d", "fp64 b", "warps=8", 90, mma="mma.sync")]
    assert mma_summary(rows) == "sm_90a, 16-bit: 1 compiles run their dots as wgmma, 1 as mma.sync:\n- k: 1 (bf16 a)"


def test_widest_load_reads_vector_loads_and_cp_async_off_the_ptx():
    from mpvit_kernels.triton.static_compile import load_widths, widest_load

    assert widest_load("@%p5 ld.global.b16 { %rs1 }, [ %rd95 + 0 ];") == 2
    assert widest_load("ld.global.L1::evict_last.v2.b16 { %rs1, %rs2 }, [ %rd1 + 0 ];\n"
                       "ld.global.b32 { %r1 }, [ %rd2 + 0 ];") == 4
    assert widest_load("@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd3 + 0 ];") == 16
    assert widest_load("cp.async.cg.shared.global [ %r70 + 0 ], [ %rd31 + 0 ], 0x10, %r71;") == 16
    assert widest_load("cp.async.ca.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 4;") == 4
    assert widest_load("st.global.v4.b32 [ %rd1 + 0 ], { %r1, %r2, %r3, %r4 };") == 0
    assert load_widths("@%p5 ld.global.b16 { %rs1 }, [ %rd95 + 0 ];\n@%p6 ld.global.b16 { %rs3 }, [ %rd96 + 0 ];\n"
                       "cp.async.ca.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x8;").count(2) == 2


def test_cuda_kernels_of_the_extension_have_no_spills():
    import torch

    from mpvit_kernels.triton.static_compile import SHARED_LIMIT, cuda_extension_usage, extension_library

    library = extension_library()
    if library is None or torch.version.cuda is None:
        pytest.skip("mpvit_kernels._C not built with CUDA")
    usage = cuda_extension_usage(library)
    assert {u.arch for u in usage} == {80, 90}
    assert {u.kernel.split("<")[0] for u in usage} >= {
        "affine_hswish_fwd_kernel", "affine_hswish_bwd_kernel", "affine_hswish_bwd_finish_kernel",
        "depthwise_fwd_kernel", "depthwise_bwd_params_kernel", "depthwise_bwd_input_kernel",
        "depthwise_bwd_finish_kernel"}
    assert [u for u in usage if u.spill_bytes or u.shared > SHARED_LIMIT[u.arch] or not u.warps_per_sm] == []


def test_compile_refuses_interpreted_kernels(monkeypatch):
    # under TRITON_INTERPRET=1 (how the suite runs on a CPU) the kernels cannot compile for a GPU:
    # a clear error, not an AttributeError from a worker
    from mpvit_kernels.triton import static_compile

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        static_compile.compile_jobs([("mpvit_kernels.triton.linear", 0, 0, 80)])


@pytest.mark.slow
def test_every_triton_launch_of_a_bf16_step_compiles_for_sm90_and_binds_as_launched():
    # Triton's interpreter neither compiles a kernel nor types its arguments. Through Triton's own
    # launch path (tools/launch_check.py over tools/stand_in_gpu.py: a stand-in driver, the launch
    # a no-op), every launch of MPViT-T's eval forward and training step under bf16 autocast
    # compiles for sm_90 with the specialisation it gets there (16-bit paths no other CPU test
    # runs) and binds its arguments as the ops pass them (a misspelt keyword or a float for an
    # int fails here, not on a GPU); at 96x96 stage 1's attention (576 tokens) takes its
    # multi-pass kernels. About 25 s, Triton's cache cold.
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "tools/launch_check.py", "--sizes", "tiny", "--dtypes", "bf16", "--shape",
                          "2,3,96,96"], cwd=root, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[:2] == ["MPViT-tiny bf16 eval (2, 3, 96, 96) sm_90: ok",
                         "MPViT-tiny bf16 train (2, 3, 96, 96) sm_90: ok"], out.stdout
    # between them every kernel the package launches, the backward's too; each case ran twice, the
    # second launch of every kernel skipping Triton's binding (DirectLaunch), checked against it
    assert len(lines[2].split()) == 1 + 22 and lines[3] == "never launched: -", out.stdout
    assert lines[4].split(": ")[1].split() == lines[2].split()[1:], out.stdout


DIRECT_LAUNCH_SCRIPT = '''
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, "tools")
import torch
import triton
import triton.language as tl
from stand_in_gpu import stand_in_gpu

launches = []
stand_in_gpu(lambda *args: launches.append(args))  # each direct launch checked against Triton's binding
from mpvit_kernels.triton.launch import DirectLaunch


@triton.jit
def scale(x_ptr, y_ptr, n, s, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * s, mask=i < n)


launch = DirectLaunch(scale)
buf = torch.zeros(80)
half = buf[:64].half()
cases = [(buf[:64], 64), (buf[1:65], 64), (buf[:64], 1), (buf[:64], 17), (half, 64), (buf[:64], 2**40)]
cases = [(x, torch.empty_like(x), n) for x, n in cases]
for x, y, n in cases + cases:  # the first round through Triton's launch path, the second directly
    launch.run(x, y, n, 0.5, grid=lambda meta: (triton.cdiv(min(meta["n"], 64), meta["BLOCK"]),), BLOCK=64)
first, second = launches[:len(cases)], launches[len(cases):]
# the same launcher call but for the launch metadata, which no hook asks for
same = all(len(a) == len(b) and all(u is v or u == v for i, (u, v) in enumerate(zip(a, b)) if i != 6)
           for a, b in zip(first, second))
from triton import knobs
knobs.runtime.debug = True  # in Triton's options, so in the key: another kernel
for _ in range(2):
    launch.run(*cases[0], 0.5, grid=(1,), BLOCK=64)
knobs.runtime.debug = False
hook = lambda metadata: None  # (the stand-in's launcher calls no hook) an exit hook alone: metadata built
knobs.runtime.launch_exit_hook.add(hook)
launch.run(*cases[0], 0.5, grid=(1,), BLOCK=64)
knobs.runtime.launch_exit_hook.remove(hook)
seen = [type(launches[-1][6]).__name__]
# the key generated for a call shape equals the general one, whatever each argument is then
x, y = cases[0][:2]
kinds = [x, y, x[1:], half, torch.nn.Parameter(x), None, True, False, 1, 0, 17, 32, -16, 2**31, 2**40, 2**63, 2**64,
         -2**63 - 1, 0.5, "s"]
for kw in ({"BLOCK": 64}, {"BLOCK": 32, "num_warps": 4}, {"n": 3, "BLOCK": 64}, {}):
    for i in range(5 if not kw else 4):
        for kind in kinds:
            args = [x, y, 64, 0.5, 64][:4 if kw else 5]  # without keywords, the constexpr BLOCK positional
            args[i] = kind
            args, k = tuple(args), dict(kw)
            if "n" in k:
                args = args[:2] + args[3:]
            assert launch.fast_key(args, k) == launch.key(args, k), (i, kind, kw)
# values a dict takes for one key (2 and 2.0, True and 1) are kept apart: the kept ones are this launch's
assert launch.fast_key((x, y, 64, 0.5), {"BLOCK": 64}) != launch.fast_key((x, y, 64, 0.5), {"BLOCK": 64.0})
assert launch.fast_key((x, y, 64, 0.5, True), {}) != launch.fast_key((x, y, 64, 0.5, 1), {})
print(len(launch.kernels), len({id(e[0]) for e in launch.kernels.values()}), same, sorted(DirectLaunch.verified), seen)
if sys.argv[1:] == ["off"]:  # MPVIT_KERNELS_DIRECT_LAUNCH=0: each launch through Triton's path
    assert not launch.kernels and not DirectLaunch.verified and len(launches) == 2 * len(cases) + 3
if sys.argv[1:] == ["coarse"]:  # a key blind to the arguments: the misaligned x would reuse the aligned kernel
    launch.kernels.clear()
    launch.fast_key = lambda args, kwargs: (len(args), tuple(kwargs))
    for x, y, n in cases[:2] * 2:
        launch.run(x, y, n, 0.5, grid=(1,), BLOCK=64)
'''


def _run_script(tmp_path, source: str, *argv: str, **env) -> subprocess.CompletedProcess:
    """``source`` run as a script from the repository's root, without TRITON_INTERPRET."""
    script = tmp_path / "script.py"
    script.write_text(source)
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env}
    return subprocess.run([sys.executable, str(script), *argv], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)


def test_direct_launches_take_the_kernel_and_arguments_tritons_binding_takes(tmp_path):
    # DirectLaunch (triton.launch), which every pinned and tuned kernel of ours launches
    # through: a key per specialisation Triton makes (address aligned or not, an integer 1, a
    # multiple of 16 or neither, 64-bit, another dtype: six kernels), each later launch of it
    # checked against Triton's own binding (the stand-in's verify) and calling the launcher as
    # Triton's path did; Triton's debug knob is part of the key (a seventh); a launch hook gets
    # its metadata; MPVIT_KERNELS_DIRECT_LAUNCH=0 leaves every launch to Triton's path; a key too
    # coarse to tell two specialisations apart fails that check.
    out = _run_script(tmp_path, DIRECT_LAUNCH_SCRIPT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.split("\n")[0] == "7 7 True ['scale'] ['LazyDict']", out.stdout
    off = _run_script(tmp_path, DIRECT_LAUNCH_SCRIPT, "off", MPVIT_KERNELS_DIRECT_LAUNCH="0")
    assert off.returncode == 0 and off.stdout.startswith("0 0 True [] ['LazyDict']"), off.stdout + off.stderr[-3000:]
    out = _run_script(tmp_path, DIRECT_LAUNCH_SCRIPT, "coarse")
    assert out.returncode != 0, out.stdout
    assert "Triton's binding picks another kernel" in out.stderr, out.stderr[-3000:]


CAPTURE_SCRIPT = '''
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, "tools")
import torch
import triton
import triton.language as tl
from stand_in_gpu import stand_in_gpu

grids = []
stand_in_gpu(lambda *args: grids.append(args[0]), every_config=True)
from mpvit_kernels.triton.launch import tuned


@triton.jit
def scale(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)


kernel = tuned([triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 32})], key=["n"])(scale)
x = torch.zeros(100)
y = torch.empty_like(x)
capturing = [True]
torch.cuda.is_initialized = lambda: True
torch.cuda.is_current_stream_capturing = lambda: capturing[0]
grid = lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)
for _ in range(2):
    kernel[grid](x, y, 100)
print(grids, len(kernel.cache))
capturing[0] = False
kernel[grid](x, y, 100)
capturing[0] = True
kernel[grid](x, y, 100)
print(grids, [c.kwargs for c in kernel.cache.values()])
'''


def test_a_tuned_kernel_inside_a_cuda_graph_capture_launches_untimed(tmp_path):
    # A key first seen while a CUDA graph is being captured (a new batch or image size): the
    # Autotuner's timing synchronises the device, which a capture refuses with an error, so the
    # first config that fits launches untimed (BLOCK=64: 2 programs) and is not kept; outside a
    # capture the key is timed as before (the stand-in's timer launches each config: 2, 4
    # programs), and a capture then launches its pick.
    out = _run_script(tmp_path, CAPTURE_SCRIPT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.splitlines() == ["[2, 2] 0", "[2, 2, 2, 4, 2, 2] [{'BLOCK': 64}]"], out.stdout
