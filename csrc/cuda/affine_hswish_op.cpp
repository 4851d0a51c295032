// The CUDA implementation of affine_hswish on the ATen side: checks, allocation, dtype dispatch,
// registration. The kernels are compiled apart, in affine_hswish.cu.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../affine_hswish.h"
#include "affine_hswish_launch.h"

namespace mpvit_kernels {
namespace {

at::Tensor affine_hswish_cuda(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
                              bool hswish) {
  check_affine_args(x_in, scale, shift);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty_like(x_in);
  if (y.numel() == 0) return y;
  const at::Tensor x = dense_as(x_in, y);
  const ChannelLayout L = channel_layout(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_hswish_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor sc = scale.to(acc_type).contiguous();
    const at::Tensor sh = shift.to(acc_type).contiguous();
    C10_CUDA_CHECK((affine_hswish::launch_forward<scalar_t, acc_t>(
        stream, x.const_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(), sh.const_data_ptr<acc_t>(),
        y.mutable_data_ptr<scalar_t>(), x.numel(), L.channels, L.inner, hswish)));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_hswish_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
    bool hswish) {
  check_affine_args(x_in, scale, shift);
  check_affine_grad(grad_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor grad_x = at::empty_like(x_in);
  at::Tensor grad_scale = at::empty_like(scale, at::MemoryFormat::Contiguous);
  at::Tensor grad_shift = at::empty_like(shift, at::MemoryFormat::Contiguous);
  const at::Tensor x = dense_as(x_in, grad_x);
  const at::Tensor grad = dense_as(grad_in.to(x_in.scalar_type()), grad_x);
  const ChannelLayout L = channel_layout(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunks = affine_hswish::backward_grid(L.outer, L.channels, L.inner).y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_hswish_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using x_t = scalar_t;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor sc = scale.to(acc_type).contiguous();
    const at::Tensor sh = shift.to(acc_type).contiguous();
    at::Tensor partial = at::empty({chunks, 2, L.channels}, x.options().dtype(acc_type));
    if (L.channels > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scale.scalar_type(), "affine_hswish_bwd_finish", [&] {
        using param_t = scalar_t;
        C10_CUDA_CHECK((affine_hswish::launch_backward<x_t, acc_t, param_t>(
            stream, grad.const_data_ptr<x_t>(), x.const_data_ptr<x_t>(), sc.const_data_ptr<acc_t>(),
            sh.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<x_t>(), partial.mutable_data_ptr<acc_t>(),
            grad_scale.mutable_data_ptr<param_t>(), grad_shift.mutable_data_ptr<param_t>(), L.outer, L.channels,
            L.inner, hswish)));
      });
    }
  });
  return {grad_x, grad_scale, grad_shift};
}

int64_t cuda_kernel_image_cuda(const at::Tensor& probe) {
  const c10::cuda::CUDAGuard guard(probe.device());
  return static_cast<int64_t>(affine_hswish::kernel_image_status());
}

}  // namespace

TORCH_LIBRARY_IMPL(mpvit_kernels, CUDA, m) {
  m.impl("affine_hswish", &affine_hswish_cuda);
  m.impl("affine_hswish_backward", &affine_hswish_backward_cuda);
  m.impl("cuda_kernel_image", &cuda_kernel_image_cuda);
}

}  // namespace mpvit_kernels
