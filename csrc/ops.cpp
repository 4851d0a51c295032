// Every schema of the mpvit_kernels namespace, in one place. Implementations register
// themselves per dispatch key in cpu/ and cuda/; fakes and autograd live in Python
// (mpvit_kernels/ops/).
#include <Python.h>
#include <torch/library.h>

// `import mpvit_kernels._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(mpvit_kernels, m) {
  // y = x * scale[c] + shift[c], then Hardswish if `hswish`; channel dim 1, any dense layout.
  m.def("affine_hswish(Tensor x, Tensor scale, Tensor shift, bool hswish) -> Tensor");
  // Returns (grad_x, grad_scale, grad_shift).
  m.def(
      "affine_hswish_backward(Tensor grad, Tensor x, Tensor scale, Tensor shift, bool hswish)"
      " -> (Tensor, Tensor, Tensor)");
  // y = depthwise k x k conv of x (padding k/2, stride 1 or 2) + bias, then * scale + shift if
  // given, Hardswish if `hswish`, + x if `residual`; y is channels-last (NHWC memory).
  m.def(
      "depthwise(Tensor x, Tensor weight, Tensor? bias, int stride, Tensor? scale, Tensor? shift, bool hswish,"
      " bool residual) -> Tensor");
  // Returns (grad_x, grad_weight, grad_bias, grad_scale, grad_shift); grad_bias is the grad of a
  // zero bias when there is none, grad_scale and grad_shift are empty without scale.
  m.def(
      "depthwise_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, int stride, Tensor? scale,"
      " Tensor? shift, bool hswish, bool residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (B, N, C) = scale * q softmax_N(k)^T v + q * crpe(v) per head, from the qkv Linear's output
  // (B, N, 3C); crpe_weights[i] (ci, 1, k, k) and crpe_biases[i] (ci,) convolve the next ci
  // channels of v. The CPU twin of the Triton op factor_attention_fwd (no backward stats).
  m.def(
      "factor_attention(Tensor qkv, SymInt H, SymInt W, int num_heads, float scale, Tensor[] crpe_weights,"
      " Tensor[] crpe_biases) -> Tensor");
  // (r, u, mean, rstd) per token of x, y (tokens (B, N, C) or rows (M, C)): s = x + y + bias,
  // r = s + next_bias, u = layer_norm(s) with weight, ln_bias, eps; mean and rstd per token in the
  // accumulation type.
  // The CPU twin of the Triton op residual_layernorm_fwd.
  m.def(
      "residual_layernorm(Tensor x, Tensor y, Tensor bias, Tensor next_bias, Tensor weight, Tensor ln_bias,"
      " float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // The cudaError_t of finding the extension's kernels on probe's device: 0 when the build has a
  // cubin for its arch or PTX its driver compiles, else what every launch there would fail with
  // (209: no kernel image for the device). CUDA builds only.
  m.def("cuda_kernel_image(Tensor probe) -> int");
}
