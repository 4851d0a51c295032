// Hardswish and its slope, one definition for the CPU twins, the CUDA kernels and the host
// emulation of the CUDA kernels (tests/cuda_host).
#pragma once

#ifdef __CUDACC__
#define MPVIT_HOST_DEVICE __host__ __device__
#else
#define MPVIT_HOST_DEVICE
#endif

namespace mpvit_kernels {

// Divisions by 6 and 3 are multiplications by their reciprocals (within an ulp of ATen's): an
// IEEE division is a subroutine call on the GPU, whose stack frame the static report would count
// as a spill.
template <typename acc_t>
MPVIT_HOST_DEVICE inline acc_t hswish_fwd(acc_t z) {
  const acc_t r = z + acc_t(3);
  return z * (r < acc_t(0) ? acc_t(0) : (r > acc_t(6) ? acc_t(6) : r)) * (acc_t(1) / acc_t(6));  // NaN stays NaN
}

// ATen's hardswish_backward branches, boundaries included (slope 0 at -3, 1 at 3).
template <typename acc_t>
MPVIT_HOST_DEVICE inline acc_t hswish_slope(acc_t z) {
  return z <= acc_t(-3) ? acc_t(0) : (z < acc_t(3) ? z * (acc_t(1) / acc_t(3)) + acc_t(0.5) : acc_t(1));
}

}  // namespace mpvit_kernels
