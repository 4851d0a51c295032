// Shared by the CPU twins. They target baseline x86-64 (what a wheel must run on). Simple loops
// get an AVX2 clone, picked at load time (MPVIT_VECTOR_CLONES); the hot ones are written on Lanes
// and run in an AVX2 + FMA copy of their parallel task's body where the CPU has them
// (with_best_isa).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MPVIT_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MPVIT_VECTOR_CLONES inline
#endif

#include <cstring>
#include <type_traits>

// Lanes values pass between inline helpers, never across a call: no ABI concern (GCC notes one
// where a sanitized build leaves a helper out of line).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mpvit_kernels {

// Every function a with_best_isa body calls is MPVIT_ALWAYS_INLINE: the body is compiled twice,
// once for AVX2 + FMA, once for the baseline ISA. (GCC's target_clones cannot ask for AVX2 and
// FMA in one clone, and a call into a helper would run it with the baseline ISA and pass its
// vectors through memory.)
#define MPVIT_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
template <typename F>
__attribute__((target("avx2,fma"))) void run_avx2_fma(const F& f) {
  f();
}
inline bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
template <typename F>
void run_avx2_fma(const F& f) {
  f();
}
inline bool has_avx2_fma() { return false; }
#endif

template <typename F>
void run_baseline(const F& f) {
  f();
}

// f(), an always-inline lambda computing in acc_t, in the copy for the best ISA this CPU has.
// fp64 gets the baseline copy alone: it runs in checks (gradcheck, fp64 references), not where
// speed counts, and its AVX2 + FMA copies were a seventh of the CPU twins' compile time.
template <typename acc_t, typename F>
void with_best_isa(const F& f) {
  if constexpr (std::is_same_v<acc_t, double>)
    run_baseline(f);
  else if (has_avx2_fma())
    run_avx2_fma(f);
  else
    run_baseline(f);
}

// V values of acc_t as one GCC vector (V > 1; a plain acc_t for V = 1): AVX2 registers in the
// AVX2 + FMA copy, SSE ones in the baseline one. The hot loops are written on them, so that they
// vectorize whatever the compiler's analysis.
template <typename acc_t, int V>
struct Lanes {
  typedef acc_t type __attribute__((vector_size(V * sizeof(acc_t))));
};
template <typename acc_t>
struct Lanes<acc_t, 1> {
  typedef acc_t type;
};

// Same-type loads and stores are one unaligned vector move (memcpy), and splat one broadcast
// (a vector-scalar operation): written lane by lane, GCC builds them from scalar inserts.
template <int V, typename acc_t, typename T>
MPVIT_ALWAYS_INLINE typename Lanes<acc_t, V>::type load(const T* p) {
  if constexpr (V == 1) {
    return static_cast<acc_t>(*p);
  } else {
    typename Lanes<acc_t, V>::type r;
    if constexpr (std::is_same_v<T, acc_t>) {
      std::memcpy(&r, p, sizeof r);
    } else {
      for (int j = 0; j < V; ++j) r[j] = static_cast<acc_t>(p[j]);
    }
    return r;
  }
}

template <int V, typename acc_t>
MPVIT_ALWAYS_INLINE typename Lanes<acc_t, V>::type splat(acc_t x) {
  if constexpr (V == 1) {
    return x;
  } else {
    const typename Lanes<acc_t, V>::type zero = {};
    return zero + x;
  }
}

template <int V, typename acc_t, typename T>
MPVIT_ALWAYS_INLINE void store(T* p, const typename Lanes<acc_t, V>::type& x) {
  if constexpr (V == 1) {
    *p = static_cast<T>(x);
  } else if constexpr (std::is_same_v<T, acc_t>) {
    std::memcpy(p, &x, sizeof x);
  } else {
    for (int j = 0; j < V; ++j) p[j] = static_cast<T>(x[j]);
  }
}

}  // namespace mpvit_kernels
