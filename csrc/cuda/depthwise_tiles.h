// How the depthwise kernels tile their work, and the grids and scratch that follows from it:
// host code, shared by the kernels (depthwise_kernels.cuh), the ATen side that sizes their
// scratch (depthwise_op.cpp) and the host emulation (tests/cuda_host). Any C++ compiler.
//
// A block of kThreads threads is CG channel lanes x PIX pixel lanes; each thread owns one pixel
// and VEC consecutive channels, read and written as one 16-byte access when VEC > 1
// (C % VEC == 0); the block's TH x TW pixels and CB = CG * VEC channels. The input it reads (the
// tile plus its halo) is staged once in shared memory.
#pragma once
#include <cstdint>

#include "../activation.h"  // MPVIT_HOST_DEVICE
#include "grid.h"

namespace mpvit_kernels {
namespace depthwise {

constexpr int kThreads = 256;
constexpr int kMaxStride = 2;

template <int VEC>
struct Tiling {
  // channel lanes: 8 vectors (128 B) per pixel, or 16 scalars (the fallback for C % VEC != 0,
  // small enough that an fp64 7x7 stride-2 halo tile fits the 48 KB of static shared memory)
  static constexpr int CG = VEC == 1 ? 16 : 8;
  static constexpr int PIX = kThreads / CG;
  static constexpr int TW = 8;
  static constexpr int TH = PIX / TW;
  static constexpr int CB = CG * VEC;
};

// Sizes of one call and its tiles: output tiles (forward, pass 1 of the backward) and input
// tiles (pass 2) per image.
struct Geometry {
  int64_t B, H, W, C, Ho, Wo;
  int stride;
  int64_t tiles_h, tiles_w, in_tiles_h, in_tiles_w, channel_blocks;
};

// Blocks pass 1 of the backward aims for (chunks x channel blocks): a constant, not the SM
// count, so that the reduction order is the same on every GPU. (The host tests lower it to
// make each chunk walk several tiles.)
#ifndef MPVIT_DEPTHWISE_PARAM_BLOCKS
#define MPVIT_DEPTHWISE_PARAM_BLOCKS 512
#endif
constexpr int64_t kParamBlocks = MPVIT_DEPTHWISE_PARAM_BLOCKS;

template <int VEC>
inline Geometry geometry(int64_t B, int64_t H, int64_t W, int64_t C, int stride) {
  using Tl = Tiling<VEC>;
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;  // odd K, padding K / 2
  return {B, H, W, C, Ho, Wo, stride, cdiv(Ho, Tl::TH), cdiv(Wo, Tl::TW), cdiv(H, Tl::TH), cdiv(W, Tl::TW),
          cdiv(C, Tl::CB)};
}

inline Grid forward_grid(const Geometry& g) { return {g.tiles_h * g.tiles_w, g.channel_blocks, g.B}; }
inline Grid input_grid(const Geometry& g) { return {g.in_tiles_h * g.in_tiles_w, g.channel_blocks, g.B}; }
MPVIT_HOST_DEVICE inline int64_t param_tiles(const Geometry& g) { return g.B * g.tiles_h * g.tiles_w; }
inline Grid params_grid(const Geometry& g) {
  const int64_t chunks = cdiv(kParamBlocks, g.channel_blocks);
  return {chunks < param_tiles(g) ? chunks : param_tiles(g), g.channel_blocks, 1};
}

// Whether every launch fits CUDA's grid limits and the kernels' 32-bit tile indices (pass 1 of
// the backward counts tiles in int, up to param_tiles + chunks).
inline bool fits_grid(const Geometry& g) {
  constexpr int64_t kMaxX = (int64_t{1} << 31) - 1, kMaxYZ = 65535;
  return forward_grid(g).x <= kMaxX && input_grid(g).x <= kMaxX && param_tiles(g) + params_grid(g).x <= kMaxX &&
         g.channel_blocks <= kMaxYZ && g.B <= kMaxYZ;
}

// Scratch elements pass 1 of the backward writes: a (K*K + 3, C) block of sums per chunk.
inline int64_t partial_numel(const Geometry& g, int K) { return params_grid(g).x * (K * K + 3) * g.C; }

}  // namespace depthwise
}  // namespace mpvit_kernels
