// The CUDA implementation of the depthwise op family on the ATen side: checks, allocation, dtype
// and tile dispatch, registration. The kernels are compiled apart, in depthwise.cu.
// Forward: one launch. Backward: parameter-grad partials (and the conv-output grad when an
// epilogue sits between the conv and y), the grad of x, a fixed-order combine: three launches.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../depthwise.h"
#include "depthwise_launch.h"

namespace mpvit_kernels {
namespace {

// Calls f(vec, k) with std::integral_constant arguments: 16-byte channel vectors when C and every
// base pointer allow them, else one channel per lane.
template <typename T, typename F>
void with_tile(int64_t C, bool aligned, int64_t K, F&& f) {
  constexpr int V = depthwise::kVec<T>;
  auto by_k = [&](auto vec) {
    switch (K) {
      case 3: return f(vec, std::integral_constant<int, 3>{});
      case 5: return f(vec, std::integral_constant<int, 5>{});
      default: return f(vec, std::integral_constant<int, 7>{});
    }
  };
  if (C % V == 0 && aligned) {
    by_k(std::integral_constant<int, V>{});
  } else {
    by_k(std::integral_constant<int, 1>{});
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

void check_grid(const depthwise::Geometry& g, const at::Tensor& x) {
  TORCH_CHECK_VALUE(depthwise::fits_grid(g), "depthwise: x of shape ", x.sizes(),
                    " needs more CUDA blocks than one launch takes (batch and channel blocks at most 65535, tiles "
                    "below 2^31): split the batch");
}

at::Tensor depthwise_cuda(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t stride, const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& shift, bool hswish, bool residual) {
  check_depthwise_args(x_in, weight, bias, stride, scale, shift, residual);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  at::Tensor y = empty_nhwc(x_in, B, C, depthwise_out_size(H, stride), depthwise_out_size(W, stride));
  if (y.numel() == 0) return y;
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);  // NHWC memory, in place when it is
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const DepthwiseParams p = depthwise_params(weight, bias, scale, shift, c10::CppTypeToScalarType<acc_t>::value);
    with_tile<scalar_t>(C, aligned16(x), weight.size(2), [&](auto vec, auto k) {
      constexpr int V = decltype(vec)::value, KS = decltype(k)::value;
      const auto g = depthwise::geometry<V>(B, H, W, C, stride);
      check_grid(g, x);
      C10_CUDA_CHECK((depthwise::launch_forward<scalar_t, acc_t, V, KS>(
          stream, g, x.const_data_ptr<scalar_t>(), p.weight.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(p.bias),
          ptr_or_null<acc_t>(p.scale), ptr_or_null<acc_t>(p.shift), y.mutable_data_ptr<scalar_t>(), hswish, residual)));
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    int64_t stride, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool hswish,
    bool residual) {
  check_depthwise_args(x_in, weight, bias, stride, scale, shift, residual);
  check_depthwise_grad(grad_in, x_in, stride);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), K = weight.size(2);
  const int64_t Ho = depthwise_out_size(H, stride), Wo = depthwise_out_size(W, stride);
  at::Tensor grad_x = empty_nhwc(x_in, B, C, H, W);
  const auto acc = at::toOpMathType(x_in.scalar_type());
  at::Tensor sums = at::zeros({(K * K + 3) * C}, x_in.options().dtype(acc));
  if (grad_x.numel() != 0) {
    const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const DepthwiseParams p = depthwise_params(weight, bias, scale, shift, acc);
      with_tile<scalar_t>(C, aligned16(x) && aligned16(grad), K, [&](auto vec, auto k) {
        constexpr int V = decltype(vec)::value, KS = decltype(k)::value;
        const auto g = depthwise::geometry<V>(B, H, W, C, stride);
        check_grid(g, x);
        const bool epilogue = hswish || p.scale.defined();
        at::Tensor gconv = at::empty({epilogue ? B * Ho * Wo * C : 0}, x.options().dtype(acc));
        at::Tensor partial = at::empty({depthwise::partial_numel(g, KS)}, x.options().dtype(acc));
        C10_CUDA_CHECK((depthwise::launch_backward<scalar_t, acc_t, V, KS>(
            stream, g, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), p.weight.const_data_ptr<acc_t>(),
            ptr_or_null<acc_t>(p.bias), ptr_or_null<acc_t>(p.scale), ptr_or_null<acc_t>(p.shift), hswish, residual,
            epilogue ? gconv.mutable_data_ptr<acc_t>() : nullptr, partial.mutable_data_ptr<acc_t>(),
            grad_x.mutable_data_ptr<scalar_t>(), sums.mutable_data_ptr<acc_t>())));
      });
    });
  }
  auto [gw, gb, gs, gt] = depthwise_param_grads(sums, weight, bias, scale);
  return {grad_x, gw, gb, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(mpvit_kernels, CUDA, m) {
  m.impl("depthwise", &depthwise_cuda);
  m.impl("depthwise_backward", &depthwise_backward_cuda);
}

}  // namespace mpvit_kernels
