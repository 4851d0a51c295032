// Shared by the CPU and CUDA twins of affine_hswish: argument checks and the dense layout
// both kernels compute on.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

namespace mpvit_kernels {

// A dense tensor of any dimension order is (outer, C, inner) in memory, with
// inner = stride of the channel dim: NCHW has inner = H*W, channels-last has inner = 1.
struct ChannelLayout {
  int64_t outer, channels, inner;
};

inline void check_affine_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "affine_hswish: x must have a channel dim 1, got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "affine_hswish: x must be floating point, got ",
                   x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == C, "affine_hswish: scale must have shape (",
                    C, ",), got ", scale.sizes());
  TORCH_CHECK_VALUE(shift.dim() == 1 && shift.size(0) == C, "affine_hswish: shift must have shape (",
                    C, ",), got ", shift.sizes());
  TORCH_CHECK_TYPE(scale.scalar_type() == shift.scalar_type() && at::isFloatingType(scale.scalar_type()),
                   "affine_hswish: scale and shift must share one floating dtype");
  TORCH_CHECK_VALUE(scale.device() == x.device() && shift.device() == x.device(),
                    "affine_hswish: x, scale and shift must be on one device");
}

inline void check_affine_grad(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "affine_hswish_backward: grad must have x's shape ", x.sizes(),
                    ", got ", grad.sizes());
  // (a grad elsewhere with x's strides would reach the kernel as it is: a pointer it cannot read)
  TORCH_CHECK_VALUE(grad.device() == x.device(), "affine_hswish_backward: grad must be on x's device ", x.device(),
                    ", got ", grad.device());
}

// The layout the output is allocated in (empty_like keeps a dense input's strides, so the fake
// implementation, `torch.empty_like(x)`, agrees), and x brought to it.
inline at::Tensor dense_as(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

inline ChannelLayout channel_layout(const at::Tensor& dense) {
  const int64_t C = dense.size(1);
  // With one channel its stride means nothing; any split of numel works.
  if (C == 1 || dense.numel() == 0) return {1, C, C == 0 ? 0 : dense.numel() / C};
  const int64_t inner = dense.stride(1);
  return {dense.numel() / (C * inner), C, inner};
}

}  // namespace mpvit_kernels
