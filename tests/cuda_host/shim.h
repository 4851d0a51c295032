// Runs CUDA kernels on the CPU, for testing their logic where there is no GPU: every CUDA
// thread is a std::thread, blocks run one after another, __syncthreads is a barrier and a
// __shared__ array is a function-local static (shared by the threads of the one running block,
// as on a GPU). A thread that returns drops out of later barriers, as an exited CUDA thread
// does. Nothing warp-level (shuffles, votes) is emulated: kernels tested this way use none.
#pragma once
#include <barrier>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
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

// The CUDA threads of a block are `n` std::threads kept for the whole process (creating threads
// is what the emulation would spend its time on, under AddressSanitizer most of all); a launch
// hands them its blocks, which they run in turn. Between two blocks every thread meets at
// `next_block`, whose completion gives the coming block a fresh barrier: a thread that returned
// early has dropped out of the previous one. Launches take turns (gridDim, blockDim and the block
// barrier are process-wide, as CUDA's are per launch). A process that forks after its first
// launch has no pool threads in the child: fork and exec only.
class ShimPool {
 public:
  explicit ShimPool(unsigned n) : n_(n), start_(n + 1), done_(n + 1) {
    for (unsigned t = 0; t < n; ++t) std::thread([this, t] { work(t); }).detach();
  }

  // The pool of n threads, made on first use and never destroyed (its threads wait at exit).
  static ShimPool& of(unsigned n) {
    static std::mutex made_lock;
    static std::map<unsigned, ShimPool*> made;
    const std::lock_guard<std::mutex> hold(made_lock);
    auto& pool = made[n];
    if (pool == nullptr) pool = new ShimPool(n);
    return *pool;
  }

  void launch(dim3 grid, const std::function<void()>& kernel) {
    static std::mutex one_launch_at_a_time;
    const std::lock_guard<std::mutex> hold(one_launch_at_a_time);
    gridDim = grid;
    blockDim = dim3{n_, 1, 1};
    kernel_ = &kernel;
    start_.arrive_and_wait();
    done_.arrive_and_wait();
  }

 private:
  void work(unsigned t) {
    for (;;) {
      start_.arrive_and_wait();
      const dim3 grid = gridDim;
      const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
      for (uint64_t b = 0; b < blocks; ++b) {
        next_block_.arrive_and_wait();
        threadIdx = dim3{t, 1, 1};
        blockIdx = dim3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                        static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
        (*kernel_)();
        shim_block_barrier->arrive_and_drop();
      }
      done_.arrive_and_wait();
    }
  }

  struct NewBlock {
    ShimPool* pool;
    void operator()() noexcept {
      pool->block_barrier_ = std::make_unique<std::barrier<>>(pool->n_);
      shim_block_barrier = pool->block_barrier_.get();
    }
  };

  unsigned n_;
  std::barrier<> start_, done_;
  std::barrier<NewBlock> next_block_{n_, NewBlock{this}};
  std::unique_ptr<std::barrier<>> block_barrier_;
  const std::function<void()>* kernel_ = nullptr;
};

template <typename Kernel>
void shim_launch(dim3 grid, unsigned threads, Kernel kernel) {
  ShimPool::of(threads).launch(grid, std::function<void()>(kernel));
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
