// The GPU entry points of the depthwise kernels, for the ATen side (depthwise_op.cpp), which
// never includes device code. depthwise.cu instantiates them for every (dtype, VEC, K) that
// with_tile picks; each launches its sequence on `stream` and returns the first launch error.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "depthwise_tiles.h"

namespace mpvit_kernels {
namespace depthwise {

// The host tests alone lower it; the .cu and the ATen side (which sizes the scratch) must agree.
static_assert(kParamBlocks == 512, "MPVIT_DEPTHWISE_PARAM_BLOCKS is for tests/cuda_host only");

// Channels per thread on the 16-byte path (C % kVec<T> == 0 and aligned pointers), else 1.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T, typename acc_t, int VEC, int K>
[[nodiscard]] cudaError_t launch_forward(cudaStream_t stream, const Geometry& g, const T* x, const acc_t* weight,
                                         const acc_t* bias, const acc_t* scale, const acc_t* shift, T* y, bool hswish,
                                         bool residual);

// Scratch as run_backward (depthwise_kernels.cuh) takes it.
template <typename T, typename acc_t, int VEC, int K>
[[nodiscard]] cudaError_t launch_backward(cudaStream_t stream, const Geometry& g, const T* grad, const T* x,
                                          const acc_t* weight, const acc_t* bias, const acc_t* scale,
                                          const acc_t* shift, bool hswish, bool residual, acc_t* gconv, acc_t* partial,
                                          T* grad_x, acc_t* param_grads);

}  // namespace depthwise
}  // namespace mpvit_kernels
