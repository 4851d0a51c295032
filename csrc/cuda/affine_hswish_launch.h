// The GPU entry points of the affine + Hardswish kernels, for the ATen side
// (affine_hswish_op.cpp); affine_hswish.cu instantiates them for the four floating dtypes.
// A dense tensor is (outer, C, inner) in memory (affine_hswish.h's ChannelLayout).
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

namespace mpvit_kernels {
namespace affine_hswish {

constexpr int kThreads = 256;
constexpr int kChannelTile = 32;     // channels per block when channels are innermost
constexpr int kMaxRowChunks = 1024;  // fixed, so the reduction order is the same on any GPU

// Channel lanes per block of the backward: 32 when channels are innermost (coalesced along
// channels), else 1 (coalesced along inner).
inline int backward_channel_tile(int64_t inner) { return inner == 1 ? kChannelTile : 1; }

// Row chunks of the backward (its grid's y): the rows of its (chunks, 2, C) partial sums.
inline int64_t backward_chunks(int64_t outer, int64_t C, int64_t inner) {
  const int64_t ct = backward_channel_tile(inner), row_lanes = kThreads / ct;
  const int64_t channel_blocks = std::max<int64_t>(1, (C + ct - 1) / ct);
  return std::clamp<int64_t>((outer * inner + row_lanes - 1) / row_lanes, 1,
                             std::max<int64_t>(1, kMaxRowChunks / channel_blocks));
}

// y = act(x * scale[c] + shift[c]) over numel elements of x, channel (i / inner) % C.
template <typename T, typename acc_t>
cudaError_t launch_forward(cudaStream_t stream, const T* x, const acc_t* scale, const acc_t* shift, T* y,
                           int64_t numel, int64_t C, int64_t inner, bool hswish);

// grad_x, and the grads of scale and shift through `partial`, backward_chunks(...) x 2 x C
// scratch. C > 0.
template <typename T, typename acc_t, typename param_t>
cudaError_t launch_backward(cudaStream_t stream, const T* grad, const T* x, const acc_t* scale, const acc_t* shift,
                            T* grad_x, acc_t* partial, param_t* grad_scale, param_t* grad_shift, int64_t outer,
                            int64_t C, int64_t inner, bool hswish);

}  // namespace affine_hswish
}  // namespace mpvit_kernels
