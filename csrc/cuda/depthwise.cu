// The depthwise kernels (depthwise_kernels.cuh) compiled for the GPU, behind the entry points of
// depthwise_launch.h. No ATen headers: nvcc parses what a .cu includes once for the host and once
// per arch, and ATen's were half of this file's compile time (52 s -> 27 s on 2 cores).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda_launch.cuh"
#include "depthwise_kernels.cuh"
#include "depthwise_launch.h"

namespace mpvit_kernels {
namespace depthwise {

template <typename T, typename acc_t, int VEC, int K>
cudaError_t launch_forward(cudaStream_t stream, const Geometry& g, const T* x, const acc_t* weight, const acc_t* bias,
                           const acc_t* scale, const acc_t* shift, T* y, bool hswish, bool residual) {
  CudaLaunch launch{stream, kThreads};
  run_forward<T, acc_t, VEC, K>(launch, g, x, weight, bias, scale, shift, y, hswish, residual);
  return launch.error;
}

template <typename T, typename acc_t, int VEC, int K>
cudaError_t launch_backward(cudaStream_t stream, const Geometry& g, const T* grad, const T* x, const acc_t* weight,
                            const acc_t* bias, const acc_t* scale, const acc_t* shift, bool hswish, bool residual,
                            acc_t* gconv, acc_t* partial, T* grad_x, acc_t* param_grads) {
  CudaLaunch launch{stream, kThreads};
  run_backward<T, acc_t, VEC, K>(launch, g, grad, x, weight, bias, scale, shift, hswish, residual, gconv, partial,
                                 grad_x, param_grads);
  return launch.error;
}

// Every combination depthwise_op.cpp dispatches to: the dtypes of AT_DISPATCH_FLOATING_TYPES_AND2
// (Half, BFloat16) with their accumulation type, VEC in {kVec<T>, 1}, K in {3, 5, 7}. A missing
// one is an undefined symbol when the extension loads.
#define MPVIT_DEPTHWISE_INSTANTIATE(T, ACC, VEC, K)                                                                 \
  template cudaError_t launch_forward<T, ACC, VEC, K>(cudaStream_t, const Geometry&, const T*, const ACC*,          \
                                                      const ACC*, const ACC*, const ACC*, T*, bool, bool);          \
  template cudaError_t launch_backward<T, ACC, VEC, K>(cudaStream_t, const Geometry&, const T*, const T*,           \
                                                       const ACC*, const ACC*, const ACC*, const ACC*, bool, bool, \
                                                       ACC*, ACC*, T*, ACC*);
#define MPVIT_DEPTHWISE_INSTANTIATE_K(T, ACC, VEC) \
  MPVIT_DEPTHWISE_INSTANTIATE(T, ACC, VEC, 3)      \
  MPVIT_DEPTHWISE_INSTANTIATE(T, ACC, VEC, 5)      \
  MPVIT_DEPTHWISE_INSTANTIATE(T, ACC, VEC, 7)
#define MPVIT_DEPTHWISE_INSTANTIATE_TYPE(T, ACC)             \
  MPVIT_DEPTHWISE_INSTANTIATE_K(T, ACC, kVec<T>)             \
  MPVIT_DEPTHWISE_INSTANTIATE_K(T, ACC, 1)

MPVIT_DEPTHWISE_INSTANTIATE_TYPE(float, float)
MPVIT_DEPTHWISE_INSTANTIATE_TYPE(double, double)
MPVIT_DEPTHWISE_INSTANTIATE_TYPE(c10::Half, float)
MPVIT_DEPTHWISE_INSTANTIATE_TYPE(c10::BFloat16, float)

}  // namespace depthwise
}  // namespace mpvit_kernels
