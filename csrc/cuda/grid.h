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

// Blocks of `per_block` to cover `work`.
inline int64_t cdiv(int64_t work, int64_t per_block) { return (work + per_block - 1) / per_block; }

}  // namespace mpvit_kernels
