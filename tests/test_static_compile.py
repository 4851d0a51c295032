"""Every Triton kernel compiles ahead of time for sm_80 and sm_90a on this CPU machine, for every
autotune config and constexpr combination the ops can launch at the model's shapes, with no
spill (STACK or LOCAL bytes in cuobjdump's resource usage), within the per-block shared-memory
limit and with one block's registers (per thread x threads) within an SM's; the kernels told
their alignment (VEC) read 16 bytes at a time as MPViT launches them; no launchable kernel lacks
a compile spec; the CUDA kernels of the extension likewise.
The table: benchmarks/results/static/resource_usage.md (`make static-report`)."""
import os

import pytest

pytest.importorskip("triton")


def test_every_kernel_compiles_for_sm80_and_sm90a_without_spills():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # compile specs are read off the kernels' own autotune lists, which the interpreter
        # narrows to one config; compile in a process of its own
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = ("from mpvit_kernels.triton.static_compile import run_all, SHARED_LIMIT\n"
                "res, missing = run_all()\n"
                "assert not missing, missing\n"
                "bad = [(u.kernel, u.tag, u.config, u.arch, u.error, u.spill_bytes, u.shared) for u in res\n"
                "       if u.error or u.spill_bytes or u.shared > SHARED_LIMIT[u.arch] or not u.warps_per_sm]\n"
                "assert not bad, bad\n"
                "assert {u.arch for u in res} == {80, 90} and len(res) > 100\n"
                "scratch = {(u.kernel, u.arch, u.tag.endswith(' TMA')) for u in res if u.scratch}\n"
                "assert scratch == {('gli_gemm_kernel', 90, True)}, scratch\n"
                "vec8 = [u for u in res if 'VEC=8 aligned' in u.tag]\n"
                "narrow = [(u.kernel, u.tag, u.arch, u.widest_load, u.two_byte_loads) for u in vec8\n"
                "          if u.widest_load != 16 or u.two_byte_loads > 4]\n"
                "assert vec8 and not narrow, narrow\n"
                "print(len(res), 'compiled')\n")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1500)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        assert "compiled" in out.stdout
        return
    from mpvit_kernels.triton.static_compile import SHARED_LIMIT, run_all

    results, missing = run_all()
    assert not missing
    assert not [u for u in results if u.error or u.spill_bytes or u.shared > SHARED_LIMIT[u.arch] or not u.warps_per_sm]
    # global scratch (a launch fails without triton.set_allocator): only where ops.gli_projection sets one
    assert {(u.kernel, u.arch, u.tag.endswith(" TMA")) for u in results if u.scratch} == {("gli_gemm_kernel", 90, True)}
    # at MPViT's widths (multiples of 8, VEC) and on aligned tensors the rows are read 16 bytes at
    # a time; a few 2-byte loads are a narrow tile's per-channel parameters, one element per
    # thread (a row read element by element makes dozens)
    vec8 = [u for u in results if "VEC=8 aligned" in u.tag]
    assert vec8 and all(u.widest_load == 16 and u.two_byte_loads <= 4 for u in vec8)


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
