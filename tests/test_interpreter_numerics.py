"""tests/interpreter_numerics.py, which the bf16 kernel tests rely on without a GPU: bf16 in Triton's
interpreter as a GPU computes it (dots of exact products accumulated in fp32, casts rounded to
nearest even), and any other bf16 arithmetic refused rather than done on the raw bits; an fp32
dot at TF32 refused; a float argument rounded to fp32 unless its parameter is typed."""
import pytest
import torch

from tests.conftest import _BF16_INTERPRETED, KERNEL_DEVICE

pytestmark = pytest.mark.skipif(KERNEL_DEVICE != "cpu" or not _BF16_INTERPRETED,
                                reason="the emulation of bf16 in Triton's interpreter (CPU tensors only)")

if KERNEL_DEVICE == "cpu":
    import triton
    import triton.language as tl

    from triton.runtime.errors import InterpreterError

    from tests.interpreter_numerics import Bf16Arithmetic, Tf32Dot

    @triton.jit
    def _dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                    PRECISION: tl.constexpr = "default"):
        m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
        a = tl.load(a_ptr + m[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * N + n[None, :])
        if PRECISION == "default":  # Triton's default input precision (tf32 for fp32 blocks)
            c = tl.dot(a, b, out_dtype=tl.float32)
        else:
            c = tl.dot(a, b, out_dtype=tl.float32, input_precision=PRECISION)
        tl.store(out_ptr + m[:, None] * N + n[None, :], c)

    @triton.jit
    def _scalar_kernel(out_ptr, plain, typed: tl.float64):
        tl.store(out_ptr, tl.full([], plain, tl.float64))
        tl.store(out_ptr + 1, tl.full([], typed, tl.float64))

    @triton.jit
    def _cast_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr, RTZ: tl.constexpr):
        i = tl.arange(0, BLOCK)
        if RTZ:
            tl.store(out_ptr + i, tl.load(x_ptr + i).to(tl.bfloat16, fp_downcast_rounding="rtz"))
        else:
            tl.store(out_ptr + i, tl.load(x_ptr + i).to(tl.bfloat16))

    @triton.jit
    def _add_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i)
        tl.store(out_ptr + i, x + x)

    @triton.jit
    def _sum_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        tl.store(out_ptr, tl.sum(tl.load(x_ptr + tl.arange(0, BLOCK)), axis=0))


def test_a_bf16_dot_is_the_fp32_product_of_the_bf16_values():
    a = torch.randn(16, 32).bfloat16()
    b = torch.randn(32, 16).bfloat16()
    out = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, out, 16, 32, 16)
    torch.testing.assert_close(out, a.float() @ b.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["default", "tf32", "tf32x3", "ieee"])
def test_an_fp32_dot_a_gpu_would_run_in_tf32_raises(precision):
    # Triton's default input_precision for fp32 operands is tf32: exact here, 10 mantissa bits on a GPU
    a, b, out = torch.randn(16, 32), torch.randn(32, 16), torch.empty(16, 16)
    if precision in ("default", "tf32"):
        with pytest.raises(InterpreterError, match=Tf32Dot.__name__):
            _dot_kernel[(1,)](a, b, out, 16, 32, 16, precision)
    else:
        _dot_kernel[(1,)](a, b, out, 16, 32, 16, precision)
        torch.testing.assert_close(out, a @ b, atol=1e-5, rtol=1e-5)


def test_a_float_argument_arrives_as_a_gpu_launch_passes_it():
    # unannotated: fp32, as Triton's launcher types a Python float; annotated tl.float64: all 64 bits
    out = torch.empty(2, dtype=torch.float64)
    _scalar_kernel[(1,)](out, 0.1, 0.1)
    assert out[0].item() == float(torch.tensor(0.1, dtype=torch.float32)) != 0.1
    assert out[1].item() == 0.1


@pytest.mark.parametrize("src", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_a_cast_to_bf16_rounds_to_nearest_even(src):
    # halfway and near-halfway values between two bf16 neighbours, both signs, and ordinary ones
    one_ulp = 2.0 ** -7
    x = torch.tensor([1 + one_ulp / 2, 1 + 3 * one_ulp / 2, 1 + one_ulp * 0.51, 1 + one_ulp * 0.49, -(1 + one_ulp / 2),
                      3.14159, -2.71828e-3, 1e30, 0.0, 65504.0, 1e-40, 7.0], dtype=src)
    x = torch.cat([x, torch.randn(52, dtype=src) * 100])
    out = torch.empty(64, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, out, 64, False)
    assert torch.equal(out.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    if src == torch.float32:  # asked for, rounding toward zero keeps the high 16 bits (the
        _cast_kernel[(1,)](x, out, 64, True)  # interpreter's own cast then, off on subnormals)
        normal = x.abs() >= torch.finfo(torch.float32).tiny
        assert torch.equal(out.view(torch.int16)[normal], (x.view(torch.int32) >> 16).to(torch.int16)[normal])


@pytest.mark.parametrize("kernel", ["add", "sum"])
def test_other_bf16_arithmetic_is_refused(kernel):
    x = torch.randn(16).bfloat16()
    out = torch.empty(16, dtype=torch.bfloat16)
    with pytest.raises(InterpreterError, match=Bf16Arithmetic.__name__):  # the interpreter's wrapping
        (_add_kernel if kernel == "add" else _sum_kernel)[(1,)](x, out, 16)
