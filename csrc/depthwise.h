// Shared by the CPU and CUDA twins of depthwise: argument checks, the NHWC views both compute
// on, the outputs' allocation (channels-last, as the fake in mpvit_kernels/ops/depthwise.py) and
// the parameters brought to the accumulation type.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>

namespace mpvit_kernels {

inline void check_depthwise_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 int64_t stride, const std::optional<at::Tensor>& scale,
                                 const std::optional<at::Tensor>& shift, bool residual) {
  TORCH_CHECK_VALUE(x.dim() == 4, "depthwise: x must be (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "depthwise: x must be floating point, got ", x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == weight.size(3) &&
                        (weight.size(2) == 3 || weight.size(2) == 5 || weight.size(2) == 7),
                    "depthwise: weight must be (", C, ", 1, k, k) with k in {3, 5, 7}, got ", weight.sizes());
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "depthwise: stride must be 1 or 2, got ", stride);
  TORCH_CHECK_VALUE(scale.has_value() == shift.has_value(), "depthwise: scale and shift come together");
  TORCH_CHECK_VALUE(!residual || stride == 1, "depthwise: residual needs stride 1");
  auto check_channel_param = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, "depthwise: ", name, " must have shape (", C, ",), got ",
                      t.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "depthwise: ", name, " must be floating point");
    TORCH_CHECK_VALUE(t.device() == x.device(), "depthwise: ", name, " must be on x's device ", x.device());
  };
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), "depthwise: weight must be floating point");
  TORCH_CHECK_VALUE(weight.device() == x.device(), "depthwise: weight must be on x's device ", x.device());
  if (bias) check_channel_param(*bias, "bias");
  if (scale) check_channel_param(*scale, "scale");
  if (shift) check_channel_param(*shift, "shift");
}

inline int64_t depthwise_out_size(int64_t in, int64_t stride) { return (in - 1) / stride + 1; }

inline void check_depthwise_grad(const at::Tensor& grad, const at::Tensor& x, int64_t stride) {
  const int64_t Ho = depthwise_out_size(x.size(2), stride), Wo = depthwise_out_size(x.size(3), stride);
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == x.size(0) && grad.size(1) == x.size(1) && grad.size(2) == Ho &&
                        grad.size(3) == Wo,
                    "depthwise_backward: grad must be (", x.size(0), ", ", x.size(1), ", ", Ho, ", ", Wo, "), got ",
                    grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == x.device(), "depthwise_backward: grad must be on x's device ", x.device(),
                    ", got ", grad.device());
}

// (B, C, H, W) allocated channels-last, i.e. NHWC memory.
inline at::Tensor empty_nhwc(const at::Tensor& like, int64_t B, int64_t C, int64_t H, int64_t W) {
  return at::empty({B, C, H, W}, like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// The parameters in the accumulation type, dense: weight as (C, K*K), the rest (C,) or undefined.
struct DepthwiseParams {
  at::Tensor weight, bias, scale, shift;
};

inline DepthwiseParams depthwise_params(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& scale,
                                        const std::optional<at::Tensor>& shift, at::ScalarType acc) {
  auto prep = [&](const std::optional<at::Tensor>& t) { return t ? t->to(acc).contiguous() : at::Tensor(); };
  return {weight.reshape({weight.size(0), -1}).to(acc).contiguous(), prep(bias), prep(scale), prep(shift)};
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Parameter grads from the (K*K + 3, C)-shaped sums the kernels produce: weight (C, K*K) first,
// then bias, scale, shift. grad_scale / grad_shift are empty without scale; grad_bias is always
// (C,) (the grad of a zero bias when there is none).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_param_grads(
    const at::Tensor& sums, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale) {
  const int64_t C = weight.size(0), KK = weight.size(2) * weight.size(3);
  // copies: outputs of an op must not share memory
  auto part = [&](int64_t start, int64_t n, at::ScalarType t) { return sums.narrow(0, start, n).to(t, false, true); };
  at::Tensor gw = part(0, C * KK, weight.scalar_type()).view(weight.sizes());
  at::Tensor gb = part(C * KK, C, bias ? bias->scalar_type() : weight.scalar_type());
  if (!scale) return {gw, gb, at::empty({0}, weight.options()), at::empty({0}, weight.options())};
  return {gw, gb, part(C * KK + C, C, scale->scalar_type()), part(C * KK + 2 * C, C, scale->scalar_type())};
}

}  // namespace mpvit_kernels
