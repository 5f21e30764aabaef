// Explicit vectors (GCC/Clang vector extensions) for the CPU loops that reduce.
//
// A compiler does not vectorise a floating-point sum without fast-math (that would reorder it),
// so the reducing loops are written on vectors. They sum over 16 logical lanes: lane k of an
// accumulator takes the elements j with j % 16 == k, in increasing j. A clone holds the 16 lanes
// in vectors of its own width W (AVX-512: one of 16, AVX2: two of 8, baseline: four of 4; wider
// vectors than the ISA has would be split element by element by GCC), so every clone computes
// the same lanes in the same order and gives bitwise the same sums; the unit partition makes
// them independent of the thread count.
//
// Accuracy without double arithmetic per element: each fp32 lane sums at most kBlock / 16 = 64
// terms (relative error below 64 * 2**-24 = 4e-6 for the non-negative sums here), then the
// block's lanes are added into double accumulators.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_common.h"
#include "rounding.h"

// Vectors as arguments of always_inline helpers: the ABI note about passing them is irrelevant.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace lomo {
namespace cpu {

constexpr int kLanes = 16;        // logical lanes of every sum
constexpr int64_t kBlock = 1024;  // elements per fp32 accumulation block (64 per lane)

// The software prefetch of the streaming loops: each run of kPrefetchRun elements asks for the
// run kPrefetchAhead elements further on (4 KiB of bf16). Measured on a 2-core EPYC (Zen 3), the
// hardware prefetcher alone fell behind when two threads stream (docs/benchmarks.md).
constexpr int64_t kPrefetchRun = 128;  // divides kBlock
constexpr int64_t kPrefetchAhead = 2048;
// A hint for the run kPrefetchAhead elements after x (write: RW = 1); past the end of a tensor it
// never faults.
template <int RW, class T>
LOMO_CPU_INLINE void prefetch_run_ahead(const T* x) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(x) + kPrefetchAhead * sizeof(T);
  for (int64_t o = 0; o < kPrefetchRun * int64_t{sizeof(T)}; o += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a + o), RW, 3);
}

// Native vectors of W fp32 lanes; D holds W / 2 doubles (one half of an F).
template <int W>
struct Vec;
#define LOMO_VEC_TYPES(W, B)                                  \
  template <>                                                 \
  struct Vec<W> {                                             \
    typedef float F __attribute__((vector_size(B)));          \
    typedef int32_t I __attribute__((vector_size(B)));        \
    typedef uint32_t U __attribute__((vector_size(B)));       \
    typedef uint16_t H __attribute__((vector_size(B / 2)));   \
    typedef double D __attribute__((vector_size(B)));         \
  };
LOMO_VEC_TYPES(4, 16)
LOMO_VEC_TYPES(8, 32)
LOMO_VEC_TYPES(16, 64)
#undef LOMO_VEC_TYPES

// x in every lane (x - 0 is x for every x, -0 and NaN included, so this is a broadcast).
template <int W>
LOMO_CPU_INLINE typename Vec<W>::F splat(float x) {
  return x - typename Vec<W>::F{};
}

// {q*W, q*W + 1, ...}: the logical lane numbers of part q.
template <int W>
LOMO_CPU_INLINE typename Vec<W>::I lane_ids(int q) {
  typename Vec<W>::I v;
  for (int k = 0; k < W; ++k) v[k] = q * W + k;
  return v;
}

// W 16-bit values widened to 32 bits, into the high half of each word (HIGH: bf16 -> fp32 bits)
// or the low half (zero-extended). Interleaving with zeros compiles to one or two shuffles
// (GCC splits __builtin_convertvector from 16 to 32 bits into halves).
template <int W, bool HIGH>
LOMO_CPU_INLINE typename Vec<W>::U widen16(const uint16_t* p) {
  using V = Vec<W>;
  typename V::H h;
  std::memcpy(&h, p, sizeof h);
  if constexpr (W == 4) {
    const typename V::U w = __builtin_convertvector(h, typename V::U);
    return HIGH ? w << 16 : w;
  } else {
    typedef uint16_t H2 __attribute__((vector_size(2 * sizeof(typename V::H))));
    const typename V::H z = {};
    H2 r;
    if constexpr (W == 8) {
      r = HIGH ? __builtin_shufflevector(z, h, 0, 8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 14, 0, 15)
               : __builtin_shufflevector(h, z, 0, 8, 1, 8, 2, 8, 3, 8, 4, 8, 5, 8, 6, 8, 7, 8);
    } else {
      r = HIGH ? __builtin_shufflevector(z, h, 0, 16, 0, 17, 0, 18, 0, 19, 0, 20, 0, 21, 0, 22, 0,
                                         23, 0, 24, 0, 25, 0, 26, 0, 27, 0, 28, 0, 29, 0, 30, 0, 31)
               : __builtin_shufflevector(h, z, 0, 16, 1, 16, 2, 16, 3, 16, 4, 16, 5, 16, 6, 16, 7,
                                         16, 8, 16, 9, 16, 10, 16, 11, 16, 12, 16, 13, 16, 14, 16,
                                         15, 16);
    }
    return (typename V::U)r;
  }
}

// Upcast of W stored elements (any alignment).
template <Fmt F, int W>
LOMO_CPU_INLINE typename Vec<W>::F vload(const storage_t<F>* p) {
  using V = Vec<W>;
  if constexpr (F == Fmt::F32) {
    typename V::F v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else if constexpr (F == Fmt::BF16) {
    return (typename V::F)widen16<W, true>(p);
  } else {  // f16_to_f32 of rounding.h, lane-wise (exact)
    const typename V::U w = widen16<W, false>(p);
    const typename V::U sign = (w & 0x8000u) << 16;
    const typename V::U em = w & 0x7FFFu;
    const typename V::U zero = {};
    const typename V::U normal =
        (em << 13) + (em >= 0x7C00u ? zero + 0x70000000u : zero + 0x38000000u);
    const typename V::F sub = (typename V::F)(em + 0x3F000000u) - 0.5f;
    return (typename V::F)(sign | (em < 0x0400u ? (typename V::U)sub : normal));
  }
}

// from_f32<F, false>(x) for an x that is not NaN: bf16 without the NaN select (which costs three
// vector operations of the eight the rounding takes); fp32 and fp16 as from_f32.
template <Fmt F>
LOMO_CPU_INLINE storage_t<F> from_f32_not_nan(float x) {
  if constexpr (F == Fmt::BF16) {
    const uint32_t b = f32_bits(x);
    return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  } else {
    return from_f32<F, false>(x, 0u);
  }
}

// Whether a[0, len) or b[0, len) holds a NaN or an Inf (an exponent field of all ones), from the
// stored words: a max over |word| (three vector operations per 16 bf16 / fp16 elements of both).
template <Fmt F>
LOMO_CPU_INLINE bool any_non_finite(const storage_t<F>* a, const storage_t<F>* b, int64_t len) {
  using U = std::conditional_t<F == Fmt::F32, uint32_t, uint16_t>;
  constexpr U abs_mask = F == Fmt::F32 ? 0x7FFFFFFFu : 0x7FFFu;
  constexpr U inf = F == Fmt::F32 ? 0x7F800000u : (F == Fmt::BF16 ? 0x7F80u : 0x7C00u);
  const U* wa = reinterpret_cast<const U*>(a);
  const U* wb = reinterpret_cast<const U*>(b);
  U m = 0;
  for (int64_t j = 0; j < len; ++j) {
    const U x = wa[j] & abs_mask, y = wb[j] & abs_mask;
    const U xy = x > y ? x : y;
    m = xy > m ? xy : m;
  }
  return m >= inf;
}

// any_non_finite for operands of two formats (a float32 gradient next to a 16-bit parameter).
template <Fmt FA, Fmt FB>
LOMO_CPU_INLINE bool any_non_finite(const storage_t<FA>* a, const storage_t<FB>* b, int64_t len) {
  if constexpr (FA == FB) {
    return any_non_finite<FA>(a, b, len);
  } else {
    return any_non_finite<FA>(a, a, len) || any_non_finite<FB>(b, b, len);
  }
}

// docs/spec.md's gradient preprocessing, as update_args.h's preprocess(), lane-wise, with the
// scalars broadcast once (outside the loops).
template <bool DIV, int W, bool CLIP = true>
struct VPre {
  using VF = typename Vec<W>::F;
  VF scale, lo, hi, coef;
  LOMO_CPU_INLINE VPre(float s, float clip, float c)
      : scale(splat<W>(s)), lo(splat<W>(-clip)), hi(splat<W>(clip)), coef(splat<W>(c)) {}
  LOMO_CPU_INLINE VF unscale(VF g) const { return DIV ? g / scale : g * scale; }
  // value clipping and clip_coef, after unscale
  LOMO_CPU_INLINE VF clip_coef(VF g) const {
    if (!CLIP) return g;
    g = g < lo ? lo : g;
    g = g > hi ? hi : g;
    return g * coef;
  }
  LOMO_CPU_INLINE VF operator()(VF g) const { return clip_coef(unscale(g)); }
};

// 16 stored elements, zero-padded after the first `len`, staged for a clone's vector loads.
template <Fmt F>
struct Padded {
  storage_t<F> v[kLanes];
  Padded(const storage_t<F>* p, int64_t len) : v{} {
    std::memcpy(v, p, static_cast<size_t>(len) * sizeof(storage_t<F>));
  }
};

// One fp32 accumulator of 16 lanes in W-wide parts.
template <int W>
struct Lanes {
  static constexpr int P = kLanes / W;
  typename Vec<W>::F v[P];
  LOMO_CPU_INLINE Lanes() : v{} {}
};

// Double accumulators of 16 lanes: lo[q] / hi[q] hold the lower / upper half of part q.
template <int W>
struct DAcc {
  static constexpr int P = kLanes / W;
  typename Vec<W>::D lo[P], hi[P];
  LOMO_CPU_INLINE DAcc() : lo{}, hi{} {}
  LOMO_CPU_INLINE void add(const Lanes<W>& f) {
    for (int q = 0; q < P; ++q) {
      const auto x = f.v[q];
      if constexpr (W == 16) {
        lo[q] += __builtin_convertvector(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7),
                                         typename Vec<W>::D);
        hi[q] += __builtin_convertvector(
            __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15), typename Vec<W>::D);
      } else if constexpr (W == 8) {
        lo[q] += __builtin_convertvector(__builtin_shufflevector(x, x, 0, 1, 2, 3),
                                         typename Vec<W>::D);
        hi[q] += __builtin_convertvector(__builtin_shufflevector(x, x, 4, 5, 6, 7),
                                         typename Vec<W>::D);
      } else {
        lo[q] += __builtin_convertvector(__builtin_shufflevector(x, x, 0, 1), typename Vec<W>::D);
        hi[q] += __builtin_convertvector(__builtin_shufflevector(x, x, 2, 3), typename Vec<W>::D);
      }
    }
  }
  // lanes 0..15 in order
  LOMO_CPU_INLINE double sum() const {
    double s = 0.0;
    for (int q = 0; q < P; ++q) {
      for (int k = 0; k < W / 2; ++k) s += lo[q][k];
      for (int k = 0; k < W / 2; ++k) s += hi[q][k];
    }
    return s;
  }
};

// acc += sum of x[j]**2 for j in [0, len), len <= kBlock: one fp32 block (x: a staging buffer).
template <int W>
LOMO_CPU_INLINE void add_squares_block(DAcc<W>& acc, const float* __restrict x, int64_t len) {
  using VF = typename Vec<W>::F;
  Lanes<W> s;
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int q = 0; q < Lanes<W>::P; ++q) {
      VF v;
      std::memcpy(&v, x + j + q * W, sizeof v);
      s.v[q] += v * v;
    }
  }
  if (j < len) {
    float buf[kLanes] = {};
    std::memcpy(buf, x + j, static_cast<size_t>(len - j) * sizeof(float));
    for (int q = 0; q < Lanes<W>::P; ++q) {
      VF v;
      std::memcpy(&v, buf + q * W, sizeof v);
      s.v[q] += v * v;
    }
  }
  acc.add(s);
}

// fma lane by lane (one rounding, as __builtin_fmaf; the clones' vectoriser makes it one vfmadd).
// The lanes go through arrays: on the vectors' own elements GCC 12 left one of LOMO's two vectors
// per group as eight scalar fmas and their shuffles (a third of its AVX2 loop).
template <int W>
LOMO_CPU_INLINE typename Vec<W>::F vfma(typename Vec<W>::F a, typename Vec<W>::F b,
                                        typename Vec<W>::F c) {
  float x[W], y[W], z[W], r[W];
  std::memcpy(x, &a, sizeof x);
  std::memcpy(y, &b, sizeof y);
  std::memcpy(z, &c, sizeof z);
  for (int k = 0; k < W; ++k) r[k] = __builtin_fmaf(x[k], y[k], z[k]);
  typename Vec<W>::F v;
  std::memcpy(&v, r, sizeof v);
  return v;
}

// ---- stochastic rounding (rounding.h) lane-wise, bitwise from_f32<F, true> for every input ----

// f32_to_bf16_stochastic, with the result in the high half of each word. MAYBE_NAN: the lanes may
// hold NaN (else the NaN select, three of the five vector operations, is left out).
template <int W, bool MAYBE_NAN>
LOMO_CPU_INLINE typename Vec<W>::U vbf16_sr(typename Vec<W>::F x, typename Vec<W>::U bits) {
  using U = typename Vec<W>::U;
  using I = typename Vec<W>::I;
  const U b = (U)x;
  if constexpr (!MAYBE_NAN) return b + (bits >> 16);
  const U nan = U{} + (uint32_t{kBF16CanonicalNaN} << 16);
  return (I)(b & 0x7FFFFFFFu) > 0x7F800000 ? nan : b + (bits >> 16);  // is_nan_bits
}

// 2**k in every lane (pow2i of rounding.h).
template <int W>
LOMO_CPU_INLINE typename Vec<W>::F vpow2(typename Vec<W>::I k) {
  return (typename Vec<W>::F)((k + 127) << 23);
}

// f32_to_f16_bits (float_bits.h) of a non-negative x that is not NaN, from its bits a.
template <int W>
LOMO_CPU_INLINE typename Vec<W>::U vf16_abs_not_nan(typename Vec<W>::U a) {
  using U = typename Vec<W>::U;
  using I = typename Vec<W>::I;
  const U sub = (U)((typename Vec<W>::F)a + 0.5f) - 0x3F000000u;
  const U nor = (a + 0x0FFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
  const I ai = (I)a;  // a < 2**31: signed compares, one instruction each on AVX2
  const U h = ai < 0x38800000 ? sub : nor;
  return ai >= 0x477FF000 ? U{} + 0x7C00u : h;  // |x| >= 65520 rounds to Inf
}

// f32_to_f16_stochastic, with the result in the low half of each word; the same exact steps.
// MAYBE_NAN: the lanes may hold NaN (else the NaN select is left out).
template <int W, bool MAYBE_NAN>
LOMO_CPU_INLINE typename Vec<W>::U vf16_sr(typename Vec<W>::F x, typename Vec<W>::U bits) {
  using U = typename Vec<W>::U;
  using I = typename Vec<W>::I;
  using VF = typename Vec<W>::F;
  const U b = (U)x, a_bits = b & 0x7FFFFFFFu;
  const VF a = (VF)a_bits, zero = {};
  I k = (I)(a_bits >> 23) - (127 + 10);
  k = k < -24 ? I{} - 24 : k;
  k = k > 100 ? I{} + 100 : k;
  const I in_range = a < 65520.0f;  // false for NaN
  const VF q = in_range ? a * vpow2<W>(-k) : zero;
  const VF f = __builtin_convertvector(__builtin_convertvector(q, I), VF);  // floor (q >= 0)
  const VF r = __builtin_convertvector((I)(bits >> 8), VF) * 5.9604644775390625e-08f;
  VF y = (f + (r < q - f ? zero + 1.0f : zero)) * vpow2<W>(k);
  y = y < 65504.0f ? y : zero + 65504.0f;
  // the exact y, or beyond the range x itself rounded to nearest (Inf); NaN: the canonical NaN
  const U h = ((b >> 16) & 0x8000u) | vf16_abs_not_nan<W>(in_range ? (U)y : a_bits);
  if constexpr (!MAYBE_NAN) return h;
  return (I)a_bits > 0x7F800000 ? U{} + kF16CanonicalNaN : h;
}

// from_f32_not_nan, or with stochastic rounding from_f32<F, true> with the random bits of element
// index idx (low word; hk: hash_high_key of the element's run).
template <Fmt F, bool SR>
LOMO_CPU_INLINE storage_t<F> round_clean(float x, uint32_t idx, uint32_t hk) {
  if constexpr (SR) {
    return from_f32<F, true>(x, mix32(idx ^ hk));
  } else {
    return from_f32_not_nan<F>(x);
  }
}

// 16 consecutive elements <-> the P = 16 / W vectors of a clone, for the element-wise fast paths.
// The vectors may hold the elements in another order than 0..15: bf16 in 256-bit vectors uses
// the order of vpunpcklwd / vpunpckhwd (per 128-bit half: elements 0-3 and 8-11 in vector 0,
// 4-7 and 12-15 in vector 1), which widens and narrows without cross-lane shuffles. Element-wise
// math does not mind; an fp32 operand is loaded in the same order (load_f32) and lane sums are
// put back in element order (logical) before they are reduced.
template <Fmt F, int W>
struct Group {
  static constexpr int P = kLanes / W;
  using V = Vec<W>;
  using VF = typename V::F;
  using S = storage_t<F>;
  static constexpr bool kUnpack = F == Fmt::BF16 && W == 8;
  typedef uint16_t H16 __attribute__((vector_size(32)));

  static LOMO_CPU_INLINE void load(const S* x, VF* v) {
    if constexpr (kUnpack) {
      H16 h;
      std::memcpy(&h, x, sizeof h);
      const H16 z = {};
      v[0] = (VF)__builtin_shufflevector(z, h, 0, 16, 0, 17, 0, 18, 0, 19, 0, 24, 0, 25, 0, 26,
                                         0, 27);
      v[1] = (VF)__builtin_shufflevector(z, h, 0, 20, 0, 21, 0, 22, 0, 23, 0, 28, 0, 29, 0, 30,
                                         0, 31);
    } else {
      for (int q = 0; q < P; ++q) v[q] = vload<F, W>(x + q * W);
    }
  }
  static LOMO_CPU_INLINE void load_f32(const float* x, VF* v) {
    if constexpr (kUnpack) {
      VF a, b;
      std::memcpy(&a, x, sizeof a);
      std::memcpy(&b, x + 8, sizeof b);
      v[0] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11);
      v[1] = __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
    } else {
      for (int q = 0; q < P; ++q) std::memcpy(&v[q], x + q * W, sizeof(VF));
    }
  }
  // 16-bit results in the high (HIGH) or low halves of r's words, stored in element order
  template <bool HIGH>
  static LOMO_CPU_INLINE void store16(S* x, const typename V::U* r) {
    if constexpr (kUnpack && HIGH) {
      const H16 h = __builtin_shufflevector((H16)r[0], (H16)r[1], 1, 3, 5, 7, 17, 19, 21, 23,
                                            9, 11, 13, 15, 25, 27, 29, 31);
      std::memcpy(x, &h, sizeof h);
    } else {
      static_assert(!kUnpack, "store16: bf16 lanes are stored from the high halves");
      for (int q = 0; q < P; ++q) {
        const typename V::H h =
            __builtin_convertvector(HIGH ? r[q] >> 16 : r[q], typename V::H);
        std::memcpy(x + q * W, &h, sizeof h);
      }
    }
  }
  // from_f32_not_nan of every lane
  static LOMO_CPU_INLINE void store_not_nan(S* x, const VF* v) {
    if constexpr (F == Fmt::F32) {
      for (int q = 0; q < P; ++q) std::memcpy(x + q * W, &v[q], sizeof(VF));
    } else if constexpr (F == Fmt::BF16) {
      typename V::U r[P];
      for (int q = 0; q < P; ++q) {  // (b + 0x7FFF + lsb) >> 16 as in from_f32_not_nan
        const typename V::U b = (typename V::U)v[q];
        r[q] = b + 0x7FFFu + ((b >> 16) & 1u);
      }
      store16<true>(x, r);
    } else {
      for (int q = 0; q < P; ++q)
        for (int k = 0; k < W; ++k) x[q * W + k] = from_f32_not_nan<F>(v[q][k]);
    }
  }
  // from_f32<F, true> of every lane with the random bits of its element: index idx + element(q,
  // k) (low word; hk: hash_high_key of the run, which must not cross a multiple of 2**32).
  // MAYBE_NAN: the lanes may hold NaN (false: they hold none, as store_not_nan's)
  template <bool MAYBE_NAN>
  static LOMO_CPU_INLINE void store_sr(S* x, const VF* v, uint32_t idx, uint32_t hk) {
    if constexpr (F == Fmt::F32) {  // stored exactly
      store_not_nan(x, v);
    } else {
      typename V::U r[P];
      for (int q = 0; q < P; ++q) {
        // rounding.h's mix32 in every lane (the 32-bit multiplies: one vpmulld each on AVX2)
        const typename V::U bits = mix32_words(((typename V::U)ids(q) + idx) ^ hk);
        r[q] = F == Fmt::BF16 ? vbf16_sr<W, MAYBE_NAN>(v[q], bits)
                              : vf16_sr<W, MAYBE_NAN>(v[q], bits);
      }
      store16<F == Fmt::BF16>(x, r);
    }
  }
  // store_not_nan, or with stochastic rounding store_sr (round_clean of every lane: no NaN)
  template <bool SR>
  static LOMO_CPU_INLINE void store_clean(S* x, const VF* v, uint32_t idx, uint32_t hk) {
    if constexpr (SR) {
      store_sr<false>(x, v, idx, hk);
    } else {
      store_not_nan(x, v);
    }
  }
  // the element (0..15) lane k of vector q holds
  static constexpr int element(int q, int k) {
    return kUnpack ? 4 * q + (k < 4 ? k : k + 4) : q * W + k;
  }
  // element() of every lane of vector q
  static LOMO_CPU_INLINE typename V::I ids(int q) {
    typename V::I v;
    for (int k = 0; k < W; ++k) v[k] = element(q, k);
    return v;
  }
  // lane sums in element order (Lanes' logical lanes)
  static LOMO_CPU_INLINE Lanes<W> logical(const Lanes<W>& a) {
    if constexpr (kUnpack) {
      Lanes<W> out;
      out.v[0] = __builtin_shufflevector(a.v[0], a.v[1], 0, 1, 2, 3, 8, 9, 10, 11);
      out.v[1] = __builtin_shufflevector(a.v[0], a.v[1], 4, 5, 6, 7, 12, 13, 14, 15);
      return out;
    } else {
      return a;
    }
  }
};

// Group<F, W>::load of 16 elements stored in format GF: F's own, or float32 (a float32 gradient
// of a 16-bit parameter, in the lane order of F's group).
template <Fmt GF, Fmt F, int W>
LOMO_CPU_INLINE void group_load(const storage_t<GF>* x, typename Vec<W>::F* v) {
  if constexpr (GF == F) {
    Group<F, W>::load(x, v);
  } else {
    static_assert(GF == Fmt::F32, "group_load: a gradient is float32 or the parameter's format");
    Group<F, W>::load_f32(x, v);
  }
}

// p[j] = from_f32<F, true>(x[j], the random bits of element idx + j) for j in [0, len), NaN
// included (x: an fp32 staging block): 16 at a time in vectors, then the tail.
template <Fmt F, int W>
LOMO_CPU_INLINE void store_sr_run(storage_t<F>* __restrict p, const float* __restrict x,
                                  int64_t len, uint32_t idx, uint32_t hk) {
  using G = Group<F, W>;
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    typename Vec<W>::F v[G::P];
    G::load_f32(x + j, v);
    G::template store_sr<true>(p + j, v, idx + static_cast<uint32_t>(j), hk);
  }
  for (; j < len; ++j) p[j] = round_clean<F, true>(x[j], idx + static_cast<uint32_t>(j), hk);
}

// p[j] = from_f32<F, true>(value(j), the random bits of element idx + j) for j in [0, len):
// value() (which may read p[j] and update state) in a plain, auto-vectorised loop into an fp32
// block of kBlock, then the block rounded by store_sr_run.
template <Fmt F, int W, class Value>
LOMO_CPU_INLINE void store_sr_blocks(storage_t<F>* p, int64_t len, uint32_t idx, uint32_t hk,
                                     const Value& value) {
  alignas(64) float x[kBlock];
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t bl = std::min(kBlock, len - b);
    for (int64_t j = 0; j < bl; ++j) x[j] = value(b + j);
    store_sr_run<F, W>(p + b, x, bl, idx + static_cast<uint32_t>(b), hk);
  }
}

}  // namespace cpu
}  // namespace lomo
