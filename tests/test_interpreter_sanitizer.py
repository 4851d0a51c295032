"""tests/interpreter_sanitizer.py, which checks every interpreted launch of the suite: an access of
an active lane outside the launch's tensor arguments is refused, naming the kernel and the
argument, and so is an element stored by two programs or loaded by one that another stores;
masked-off lanes, and views of one storage passed side by side, are not; a masked-off lane of a
load without ``other`` reads NaN, not zero. And conftest's NaN in fresh allocations, which shows
a read of memory nothing wrote."""
import pytest
import torch

from tests.conftest import _ACCESSES_CHECKED, KERNEL_DEVICE

pytestmark = pytest.mark.skipif(KERNEL_DEVICE != "cpu" or not _ACCESSES_CHECKED,
                                reason="the access checks of Triton's interpreter (CPU tensors only)")

if KERNEL_DEVICE == "cpu":
    import triton
    import triton.language as tl
    from triton.runtime.errors import InterpreterError

    from tests import interpreter_sanitizer

    @triton.jit
    def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, READ_PAST: tl.constexpr, WRITE_PAST: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n + READ_PAST, other=0.0)
        tl.store(y_ptr + i, x, mask=i < n + WRITE_PAST)

    @triton.jit
    def _masked_load_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, OTHER: tl.constexpr):
        i = tl.arange(0, BLOCK)
        if OTHER:
            x = tl.load(x_ptr + i, mask=i < n, other=0)
        else:
            x = tl.load(x_ptr + i, mask=i < n)  # the masked-off lanes undefined on a GPU
        tl.store(out_ptr + i, x)  # every lane

    @triton.jit
    def _add_kernel(x_ptr, n, BLOCK: tl.constexpr, PAST: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.atomic_add(x_ptr + i, 1.0, mask=i < n + PAST)

    @triton.jit
    def _tiles_kernel(x_ptr, y_ptr, STEP: tl.constexpr, BLOCK: tl.constexpr, READ_NEXT: tl.constexpr):
        """Program p copies x's elements p*STEP .. p*STEP + BLOCK - 1 to y (tiles overlap where
        STEP < BLOCK); with READ_NEXT it reads them from y, shifted by one, instead."""
        i = tl.program_id(0) * STEP + tl.arange(0, BLOCK)
        if READ_NEXT:
            tl.store(y_ptr + i, tl.load(y_ptr + i + 1))
        else:
            tl.store(y_ptr + i, tl.load(x_ptr + i))


def _refused(launch) -> str:
    with pytest.raises(InterpreterError) as info:
        launch()
    assert isinstance(info.value.__cause__, interpreter_sanitizer.OutOfBounds)
    return str(info.value.__cause__)


def test_masked_lanes_and_views_of_one_storage_pass():
    x, y = torch.randn(10), torch.empty(10)
    before = interpreter_sanitizer.checked_launches
    _copy_kernel[(1,)](x, y, 10, BLOCK=16, READ_PAST=0, WRITE_PAST=0)  # six lanes past both, masked off
    assert torch.equal(x, y) and interpreter_sanitizer.checked_launches == before + 1
    both = torch.randn(2, 10)  # two views of one storage, as q, k and v of one qkv
    _copy_kernel[(1,)](both[0], both[1], 10, BLOCK=16, READ_PAST=0, WRITE_PAST=0)
    assert torch.equal(both[0], both[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int32], ids=["fp32", "fp16", "int32"])
def test_a_masked_off_lane_of_a_load_without_other_is_not_zero(dtype):
    # Triton leaves those lanes undefined, which its interpreter filled with zeros: a kernel that
    # used them passed here and not on a GPU. Now NaN (integers: their largest value)
    x, out = torch.arange(1, 11).to(dtype), torch.empty(16, dtype=dtype)
    _masked_load_kernel[(1,)](x, out, 10, BLOCK=16, OTHER=True)
    assert torch.equal(out[:10], x) and (out[10:] == 0).all()
    _masked_load_kernel[(1,)](x, out, 10, BLOCK=16, OTHER=False)
    past = out[10:]
    assert torch.equal(out[:10], x)
    assert past.isnan().all() if dtype.is_floating_point else (past == torch.iinfo(dtype).max).all()


def test_a_kernel_of_ours_launched_outside_triton_device_is_refused():
    # on a GPU it would launch on the current device rather than its tensors'
    from mpvit_kernels import backend
    from mpvit_kernels.triton import affine_hswish as kernels

    M, C = 8, 4
    z, tile_mean, tile_m2 = torch.randn(M, C), torch.empty(1, C), torch.empty(1, C)
    block_m, tiles = kernels.stats_tile()

    def launch():
        kernels.tile_stats_kernel[(1, 1)](z, tile_mean, tile_m2, M, C, ACC=tl.float32, BLOCK_M=block_m,
                                           BLOCK_C=kernels.block_c(C), TILES=tiles, VEC=1)

    with pytest.raises(interpreter_sanitizer.UnguardedLaunch, match="tile_stats_kernel"):
        launch()
    with backend.triton_device(z):
        launch()
    torch.testing.assert_close(tile_mean[0], z.mean(0))


def test_a_grid_past_cuda_limits_is_refused():
    x, y = torch.randn(16), torch.empty(16)
    for grid in ((1, 65536), (1, 1, 65536), (2 ** 31, )):  # refused before any program runs
        with pytest.raises(interpreter_sanitizer.GridTooLarge, match="_copy_kernel"):
            _copy_kernel[grid](x, y, 16, BLOCK=16, READ_PAST=0, WRITE_PAST=0)


def test_a_lane_past_a_tensor_is_refused_naming_the_kernel_and_the_argument():
    x, y = torch.randn(10, dtype=torch.float64), torch.empty(10, dtype=torch.float64)
    message = _refused(lambda: _copy_kernel[(1,)](x, y, 10, BLOCK=16, READ_PAST=1, WRITE_PAST=0))
    assert message.startswith("_copy_kernel: a load of 8-byte elements touches 1 address(es)")
    assert "at byte 80 of 'x_ptr', which spans 80" in message
    message = _refused(lambda: _copy_kernel[(1,)](x, y, 9, BLOCK=16, READ_PAST=0, WRITE_PAST=2))
    assert message.startswith("_copy_kernel: a store") and "'y_ptr'" in message
    message = _refused(lambda: _add_kernel[(1,)](torch.zeros(10), 10, BLOCK=16, PAST=3))
    assert message == ("_add_kernel: an atomic of 4-byte elements touches 3 address(es) outside its tensor "
                       "arguments, the first at byte 40 of 'x_ptr', which spans 40")


def test_a_view_is_its_own_bounds_not_its_storage():
    """On a GPU the rest of the storage is another tensor's memory as often as not."""
    storage = torch.randn(20)
    y = torch.empty(10)
    message = _refused(lambda: _copy_kernel[(1,)](storage[:10], y, 10, BLOCK=16, READ_PAST=2, WRITE_PAST=0))
    assert "2 address(es)" in message and "'x_ptr', which spans 40" in message
    message = _refused(lambda: _copy_kernel[(1,)](storage[5:15], torch.empty(0), 0, BLOCK=16, READ_PAST=0,
                                                  WRITE_PAST=1))
    assert message.endswith("the first at byte 0 of 'y_ptr', which spans 0")  # an empty tensor has no bytes


def test_programs_sharing_an_element_are_a_race():
    x = torch.randn(48)
    _tiles_kernel[(3,)](x, y := torch.empty(48), STEP=16, BLOCK=16, READ_NEXT=False)  # tiles side by side
    assert torch.equal(x, y)
    with pytest.raises(interpreter_sanitizer.Race) as info:
        _tiles_kernel[(3,)](x, torch.empty(48), STEP=15, BLOCK=16, READ_NEXT=False)
    assert str(info.value) == ("_tiles_kernel: programs (0, 0, 0) and (1, 0, 0) both store the element at byte 60 "
                               "of 'y_ptr', which spans 192")
    with pytest.raises(interpreter_sanitizer.Race) as info:
        _tiles_kernel[(2,)](x, torch.empty(33), STEP=16, BLOCK=16, READ_NEXT=True)
    assert str(info.value) == ("_tiles_kernel: program (0, 0, 0) loads the element at byte 64 of 'y_ptr', which "
                               "spans 132, which program (1, 0, 0) stores in the same launch")


def test_the_ops_launches_are_checked():
    from mpvit_kernels import ops

    before = interpreter_sanitizer.checked_launches
    x = torch.randn(2, 5, 8)
    ops.linear(x, torch.randn(12, 8), torch.randn(12), gelu=True)
    assert interpreter_sanitizer.checked_launches > before


def test_fresh_allocations_hold_nan_so_reading_what_nothing_wrote_shows():
    """A kernel that sums a partial-sum row no program wrote, or returns an element it never
    stored, gives NaN rather than whatever the allocator's memory held (often zeros, which pass)."""
    from mpvit_kernels import ops

    assert torch.are_deterministic_algorithms_enabled()
    assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.randn(2).new_empty(4)).all()
    assert (torch.empty(2, dtype=torch.int32) == torch.iinfo(torch.int32).max).all()
    assert not ops.linear(torch.randn(2, 5, 8), torch.randn(12, 8), torch.randn(12), gelu=True).isnan().any()
