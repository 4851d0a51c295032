// The affine + Hardswish CUDA kernels (csrc/cuda/affine_hswish_kernels.cuh) and their launch
// sequences, run on the CPU through shim.h, behind a C interface for tests/test_affine_hswish.py.
#include "shim.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../../csrc/cuda/affine_hswish_kernels.cuh"

using namespace mpvit_kernels::affine_hswish;

namespace {

// dtype: 0 float, 1 double, 2 half, 3 bfloat16; parameters (and their grads) in the accumulation
// type.
template <typename F>
int by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}, float{}); return 0;
    case 1: f(double{}, double{}); return 0;
    case 2: f(c10::Half{}, float{}); return 0;
    case 3: f(c10::BFloat16{}, float{}); return 0;
  }
  return 1;
}

}  // namespace

extern "C" {

// Rows of the backward's partial sums (backward_grid's y), each 2 x C.
int64_t ah_partial_chunks(int64_t outer, int64_t C, int64_t inner) { return backward_grid(outer, C, inner).y; }

// Dense tensors (outer, C, inner) of numel = outer * C * inner elements. Returns 0 when it ran.
int ah_forward(int dtype, const void* x, const void* scale, const void* shift, void* y, int64_t numel, int64_t C,
               int64_t inner, int hswish) {
  return by_dtype(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    run_forward(ShimLaunch{kThreads}, static_cast<const T*>(x), static_cast<const A*>(scale),
                static_cast<const A*>(shift), static_cast<T*>(y), numel, C, inner, hswish != 0);
  });
}

int ah_backward(int dtype, const void* grad, const void* x, const void* scale, const void* shift, void* grad_x,
                void* partial, void* grad_scale, void* grad_shift, int64_t outer, int64_t C, int64_t inner,
                int hswish) {
  return by_dtype(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    run_backward(ShimLaunch{kThreads}, static_cast<const T*>(grad), static_cast<const T*>(x),
                 static_cast<const A*>(scale), static_cast<const A*>(shift), static_cast<T*>(grad_x),
                 static_cast<A*>(partial), static_cast<A*>(grad_scale), static_cast<A*>(grad_shift), outer, C, inner,
                 hswish != 0);
  });
}
}
