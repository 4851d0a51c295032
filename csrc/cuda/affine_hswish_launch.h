// The GPU entry points of the affine + Hardswish kernels, for the ATen side
// (affine_hswish_op.cpp), which never includes device code; affine_hswish.cu instantiates them
// for the four floating dtypes. Each returns the first launch error of its sequence.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "affine_hswish_grid.h"

namespace mpvit_kernels {
namespace affine_hswish {

// The host tests alone lower it; the .cu and the ATen side (which sizes the scratch) must agree.
static_assert(kMaxRowChunks == 1024, "MPVIT_AFFINE_HSWISH_MAX_ROW_CHUNKS is for tests/cuda_host only");

// As run_forward (affine_hswish_kernels.cuh).
template <typename T, typename acc_t>
[[nodiscard]] cudaError_t launch_forward(cudaStream_t stream, const T* x, const acc_t* scale, const acc_t* shift, T* y,
                                         int64_t numel, int64_t C, int64_t inner, bool hswish);

// As run_backward: partial has backward_grid(outer, C, inner).y * 2 * C elements.
template <typename T, typename acc_t, typename param_t>
[[nodiscard]] cudaError_t launch_backward(cudaStream_t stream, const T* grad, const T* x, const acc_t* scale,
                                          const acc_t* shift, T* grad_x, acc_t* partial, param_t* grad_scale,
                                          param_t* grad_shift, int64_t outer, int64_t C, int64_t inner, bool hswish);

// cudaSuccess when this build holds code that runs on the current device (a cubin of its arch,
// or PTX its driver can compile), else the error any launch of ours would give there
// (cudaErrorNoKernelImageForDevice, cudaErrorUnsupportedPtxVersion, ...). Every kernel of the
// library is built for the same archs, so one kernel answers for all.
[[nodiscard]] cudaError_t kernel_image_status();

}  // namespace affine_hswish
}  // namespace mpvit_kernels
