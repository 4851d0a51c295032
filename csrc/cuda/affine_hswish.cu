// The affine + Hardswish kernels (affine_hswish_kernels.cuh) compiled for the GPU, behind the
// entry points of affine_hswish_launch.h; no ATen headers (see depthwise.cu).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "affine_hswish_kernels.cuh"
#include "affine_hswish_launch.h"
#include "cuda_launch.cuh"

namespace mpvit_kernels {
namespace affine_hswish {

template <typename T, typename acc_t>
cudaError_t launch_forward(cudaStream_t stream, const T* x, const acc_t* scale, const acc_t* shift, T* y,
                           int64_t numel, int64_t C, int64_t inner, bool hswish) {
  CudaLaunch launch{stream, kThreads};
  run_forward(launch, x, scale, shift, y, numel, C, inner, hswish);
  return launch.error;
}

template <typename T, typename acc_t, typename param_t>
cudaError_t launch_backward(cudaStream_t stream, const T* grad, const T* x, const acc_t* scale, const acc_t* shift,
                            T* grad_x, acc_t* partial, param_t* grad_scale, param_t* grad_shift, int64_t outer,
                            int64_t C, int64_t inner, bool hswish) {
  CudaLaunch launch{stream, kThreads};
  run_backward(launch, grad, x, scale, shift, grad_x, partial, grad_scale, grad_shift, outer, C, inner, hswish);
  return launch.error;
}

cudaError_t kernel_image_status() {
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, affine_hswish_fwd_kernel<float, float, int32_t>);
  // A failed runtime call is also the thread's last error: clear ours, or the next launch's
  // cudaGetLastError would report it as that launch's failure (a success leaves any other's).
  if (status != cudaSuccess) (void)cudaGetLastError();
  return status;
}

// The dtypes of AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16) with their accumulation type; the
// parameters' dtype is dispatched on its own. A missing one is an undefined symbol at load.
#define MPVIT_AFFINE_HSWISH_INSTANTIATE_BACKWARD(T, ACC, PARAM)                                                      \
  template cudaError_t launch_backward<T, ACC, PARAM>(cudaStream_t, const T*, const T*, const ACC*, const ACC*, T*, \
                                                      ACC*, PARAM*, PARAM*, int64_t, int64_t, int64_t, bool);
#define MPVIT_AFFINE_HSWISH_INSTANTIATE(T, ACC)                                                                      \
  template cudaError_t launch_forward<T, ACC>(cudaStream_t, const T*, const ACC*, const ACC*, T*, int64_t, int64_t, \
                                              int64_t, bool);                                                       \
  MPVIT_AFFINE_HSWISH_INSTANTIATE_BACKWARD(T, ACC, float)                                                           \
  MPVIT_AFFINE_HSWISH_INSTANTIATE_BACKWARD(T, ACC, double)                                                          \
  MPVIT_AFFINE_HSWISH_INSTANTIATE_BACKWARD(T, ACC, c10::Half)                                                       \
  MPVIT_AFFINE_HSWISH_INSTANTIATE_BACKWARD(T, ACC, c10::BFloat16)

MPVIT_AFFINE_HSWISH_INSTANTIATE(float, float)
MPVIT_AFFINE_HSWISH_INSTANTIATE(double, double)
MPVIT_AFFINE_HSWISH_INSTANTIATE(c10::Half, float)
MPVIT_AFFINE_HSWISH_INSTANTIATE(c10::BFloat16, float)

}  // namespace affine_hswish
}  // namespace mpvit_kernels
