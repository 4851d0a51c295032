// A launch's grid of blocks. The launch sequences of every kernel family (<name>_kernels.cuh)
// call launch(kernel, grid, args...), which runs `kernel` over grid.x * grid.y * grid.z blocks of
// the family's thread count: CudaLaunch (cuda_launch.cuh) on a GPU, ShimLaunch
// (tests/cuda_host/shim.h) on the CPU. Any C++ compiler.
#pragma once
#include <cstdint>

namespace mpvit_kernels {

struct Grid {
  int64_t x, y, z;
};

}  // namespace mpvit_kernels
