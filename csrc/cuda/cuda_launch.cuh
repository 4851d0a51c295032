// The launch functor of the launch sequences on a GPU (see grid.h): each launch goes on `stream`
// with `threads` threads a block; after a failed launch the rest of the sequence is skipped and
// `error` says why.
#pragma once
#include <cuda_runtime.h>

#include "grid.h"

namespace mpvit_kernels {

struct CudaLaunch {
  cudaStream_t stream;
  int threads;
  cudaError_t error = cudaSuccess;

  template <typename... KArgs, typename... Args>
  void operator()(void (*kernel)(KArgs...), Grid grid, Args... args) {
    if (error != cudaSuccess) return;
    if (grid.x > 2147483647 || grid.y > 65535 || grid.z > 65535) {  // (narrowed to unsigned below: would wrap)
      error = cudaErrorInvalidConfiguration;
      return;
    }
    kernel<<<dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y), static_cast<unsigned>(grid.z)),
             threads, 0, stream>>>(args...);
    error = cudaGetLastError();
  }
};

}  // namespace mpvit_kernels
