// Shared by the CPU twins. They target baseline x86-64 (what a wheel must run on); their hot
// loops also get an AVX2 clone, picked at load time.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MPVIT_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MPVIT_VECTOR_CLONES inline
#endif
