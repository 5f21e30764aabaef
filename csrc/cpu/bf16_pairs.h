// 16 bf16 elements as 32-bit words in 256-bit vectors (AVX2), widened and narrowed without
// shuffles: a group for LOMO's bf16 fast path with the interface of cpu_vec.h's Group.
//
// Word i of the 16 stored elements holds element 2i in its low half and element 2i + 1 in its
// high half. Widened, vector 0 holds the even elements (the words shifted left by 16: one shift)
// and vector 1 the odd ones (the words with the low half cleared: one and); narrowed, the rounded
// words come back as (even >> 16) | (odd & 0xFFFF0000). Group's vpunpck order compiles (GCC) to
// six shuffles per 16 elements to widen p and g and three to narrow, and on AVX2 the shuffles
// share two ports with the shifts; here those are four and / shift operations to widen and three
// to narrow.
// Element-wise math does not mind the order; the lane sums are put back in element order
// (logical) before they are reduced, so the sums are bitwise Group's.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_vec.h"

namespace lomo {
namespace cpu {

template <int W>
struct Bf16Pairs {
  static_assert(W == 8, "Bf16Pairs: 16 elements in two vectors of 8 lanes");
  static constexpr int P = 2;
  using V = Vec<W>;
  using VF = typename V::F;
  using U = typename V::U;

  static LOMO_CPU_INLINE void load(const uint16_t* x, VF* v) {
    U w;
    std::memcpy(&w, x, sizeof w);
    v[0] = (VF)(w << 16);
    v[1] = (VF)(w & 0xFFFF0000u);
  }
  // 16 fp32 values (a per-element operand next to the bf16 ones) in the same lane order
  static LOMO_CPU_INLINE void load_f32(const float* x, VF* v) {
    VF a, b;
    std::memcpy(&a, x, sizeof a);
    std::memcpy(&b, x + 8, sizeof b);
    v[0] = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14);
    v[1] = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
  }
  // bf16 results in the high halves of r's words, stored in element order
  static LOMO_CPU_INLINE void store16(uint16_t* x, const U* r) {
    const U w = (r[0] >> 16) | (r[1] & 0xFFFF0000u);
    std::memcpy(x, &w, sizeof w);
  }
  // from_f32_not_nan of every lane: (b + 0x7FFF + lsb) >> 16, as Group's
  static LOMO_CPU_INLINE void store_not_nan(uint16_t* x, const VF* v) {
    U r[P];
    for (int q = 0; q < P; ++q) {
      const U b = (U)v[q];
      r[q] = b + 0x7FFFu + ((b >> 16) & 1u);
    }
    store16(x, r);
  }
  // from_f32<BF16, true> of every lane with the random bits of its element, as Group's
  template <bool MAYBE_NAN>
  static LOMO_CPU_INLINE void store_sr(uint16_t* x, const VF* v, uint32_t idx, uint32_t hk) {
    U r[P];
    for (int q = 0; q < P; ++q)
      r[q] = vbf16_sr<W, MAYBE_NAN>(v[q], mix32_words(((U)ids(q) + idx) ^ hk));
    store16(x, r);
  }
  template <bool SR>
  static LOMO_CPU_INLINE void store_clean(uint16_t* x, const VF* v, uint32_t idx, uint32_t hk) {
    if constexpr (SR) {
      store_sr<false>(x, v, idx, hk);
    } else {
      store_not_nan(x, v);
    }
  }
  // the element (0..15) lane k of vector q holds
  static constexpr int element(int q, int k) { return 2 * k + q; }
  static LOMO_CPU_INLINE typename V::I ids(int q) {
    typename V::I v;
    for (int k = 0; k < W; ++k) v[k] = element(q, k);
    return v;
  }
  // lane sums in element order (Lanes' logical lanes)
  static LOMO_CPU_INLINE Lanes<W> logical(const Lanes<W>& a) {
    Lanes<W> out;
    out.v[0] = __builtin_shufflevector(a.v[0], a.v[1], 0, 8, 1, 9, 2, 10, 3, 11);
    out.v[1] = __builtin_shufflevector(a.v[0], a.v[1], 4, 12, 5, 13, 6, 14, 7, 15);
    return out;
  }
};

// The group of a loop over 16 elements of format F with a gradient of format GF in a clone of
// W lanes: Bf16Pairs for bf16 p and g on AVX2, else cpu_vec.h's Group; group_of_load loads the
// gradient in its lane order.
template <Fmt F, Fmt GF, int W>
constexpr bool kBf16Pairs = F == Fmt::BF16 && GF == F && W == 8;
template <Fmt F, Fmt GF, int W>
using GroupOf = std::conditional_t<kBf16Pairs<F, GF, W>, Bf16Pairs<8>, Group<F, W>>;

template <Fmt F, Fmt GF, int W>
LOMO_CPU_INLINE void group_of_load(const storage_t<GF>* x, typename Vec<W>::F* v) {
  if constexpr (kBf16Pairs<F, GF, W>) {
    Bf16Pairs<W>::load(x, v);
  } else {
    group_load<GF, F, W>(x, v);
  }
}

}  // namespace cpu
}  // namespace lomo
