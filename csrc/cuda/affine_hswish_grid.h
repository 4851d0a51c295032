// The grids of the affine + Hardswish kernels: host code shared by their launch sequences
// (affine_hswish_kernels.cuh), the ATen side that sizes their scratch (affine_hswish_op.cpp) and
// the host emulation (tests/cuda_host). Any C++ compiler. A dense tensor is (outer, C, inner) in
// memory (affine_hswish.h's ChannelLayout); a "row" is one (outer, inner) pair.
#pragma once
#include <algorithm>
#include <cstdint>

#include "grid.h"

namespace mpvit_kernels {
namespace affine_hswish {

constexpr int kThreads = 256;
constexpr int kChannelTile = 32;  // channels per block of the backward when channels are innermost
constexpr int64_t kMaxBlocks = int64_t{1} << 16;  // grid-stride kernels: a capped grid

// Row chunks of the backward, the y of its grid: fixed, so that the reduction order is the same
// on any GPU. (The host tests lower it to make each chunk walk several rows per lane.)
#ifndef MPVIT_AFFINE_HSWISH_MAX_ROW_CHUNKS
#define MPVIT_AFFINE_HSWISH_MAX_ROW_CHUNKS 1024
#endif
constexpr int64_t kMaxRowChunks = MPVIT_AFFINE_HSWISH_MAX_ROW_CHUNKS;

// Forward: four elements a thread before the grid strides.
inline Grid forward_grid(int64_t numel) { return {std::min(cdiv(numel, kThreads * 4), kMaxBlocks), 1, 1}; }

// Channel lanes per block of the backward: 32 when channels are innermost (coalesced along
// channels), else 1 (coalesced along inner); the other kThreads / ct lanes walk rows.
inline int backward_channel_tile(int64_t inner) { return inner == 1 ? kChannelTile : 1; }

// (channel blocks, row chunks): the backward's grid; its partial sums are (chunks, 2, C).
inline Grid backward_grid(int64_t outer, int64_t C, int64_t inner) {
  const int64_t ct = backward_channel_tile(inner), row_lanes = kThreads / ct;
  const int64_t channel_blocks = std::max<int64_t>(1, cdiv(C, ct));
  return {channel_blocks,
          std::clamp<int64_t>(cdiv(outer * inner, row_lanes), 1, std::max<int64_t>(1, kMaxRowChunks / channel_blocks)),
          1};
}

// The combine of the backward's partial sums: one thread per (scale or shift, channel).
inline Grid finish_grid(int64_t C) { return {std::min(cdiv(2 * C, kThreads), kMaxBlocks), 1, 1}; }

}  // namespace affine_hswish
}  // namespace mpvit_kernels
