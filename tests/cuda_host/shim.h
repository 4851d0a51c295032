// Runs CUDA kernels on the CPU, for testing their logic where there is no GPU: every CUDA
// thread is a std::thread, blocks run one after another, __syncthreads is a barrier and a
// __shared__ array is a function-local static (shared by the threads of the one running block,
// as on a GPU). A thread that returns drops out of later barriers, as an exited CUDA thread
// does. Nothing warp-level (shuffles, votes) is emulated: kernels tested this way use none.
#pragma once
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

#include "../../csrc/cuda/grid.h"

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;
inline std::barrier<>* shim_block_barrier = nullptr;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() shim_block_barrier->arrive_and_wait()

template <typename Kernel>
void shim_launch(dim3 grid, unsigned threads, Kernel kernel) {
  gridDim = grid;
  blockDim = dim3{threads, 1, 1};
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        shim_block_barrier = &barrier;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = dim3{t, 1, 1};
            blockIdx = dim3{bx, by, bz};
            kernel();
            barrier.arrive_and_drop();
          });
        for (auto& th : pool) th.join();
      }
}

// The launch functor of csrc/cuda's launch sequences (csrc/cuda/grid.h), on the CPU.
struct ShimLaunch {
  unsigned threads;

  template <typename... KArgs, typename... Args>
  void operator()(void (*kernel)(KArgs...), mpvit_kernels::Grid grid, Args... args) const {
    shim_launch(dim3{static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y), static_cast<unsigned>(grid.z)},
                threads, [&] { kernel(args...); });
  }
};
