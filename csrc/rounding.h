// Up/down-casts between fp32 and the stored dtypes, and the stochastic-rounding hash.
//
// Host and device share these definitions so every native kernel rounds bit for bit like
// lomo_kernels/reference.py (round_to_dtype, random_bits); the integer conversions themselves are
// in float_bits.h. A NaN is stored as the canonical quiet NaN of its dtype on every backend and
// both devices (docs/spec.md), not as the GPU conversion's 0x7FFF.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#include "float_bits.h"

namespace lomo {

// Storage formats of a parameter; math is always fp32.
enum class Fmt { F32, F16, BF16 };

template <Fmt F> struct StorageOf { using type = uint16_t; };
template <> struct StorageOf<Fmt::F32> { using type = float; };
template <Fmt F> using storage_t = typename StorageOf<F>::type;

// ------------------------------------------------------------------------------------------
// The hash (reference.py): lowbias32, key = mix32(seed ^ mix32(step)),
// bits(i) = mix32(lo32(i) ^ mix32(hi32(i) ^ key)). The high half is hoisted by callers (it is
// constant over any run of indices that does not cross a multiple of 2**32).
// ------------------------------------------------------------------------------------------
// U: a 32-bit word, or on the CPU a vector of them (cpu/cpu_vec.h: the hash in vector lanes).
template <class U>
LOMO_HD U mix32_words(U x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

LOMO_HD uint32_t mix32(uint32_t x) { return mix32_words(x); }

LOMO_HD uint32_t hash_high_key(uint32_t key, uint64_t i) {
  return mix32(static_cast<uint32_t>(i >> 32) ^ key);
}

LOMO_HD uint32_t random_bits(uint32_t key, uint64_t i) {
  return mix32(static_cast<uint32_t>(i) ^ hash_high_key(key, i));
}

inline uint32_t rounding_key(int64_t seed, int64_t step) {
  // Python's `x & 0xFFFFFFFF` on a negative int is the two's complement low word, as here.
  return mix32(static_cast<uint32_t>(static_cast<uint64_t>(seed)) ^
               mix32(static_cast<uint32_t>(static_cast<uint64_t>(step))));
}

// ------------------------------------------------------------------------------------------
// bf16
// ------------------------------------------------------------------------------------------
LOMO_HD float bf16_to_f32(uint16_t h) { return bf16_bits_to_f32(h); }

// Round to nearest even, as tensor.to(torch.bfloat16); NaN -> the canonical quiet NaN.
LOMO_HD uint16_t f32_to_bf16_nearest(float x) { return f32_to_bf16_bits(x, kBF16CanonicalNaN); }

// Add 16 random low bits and truncate (reference._sr_bf16). NaN rounds to nearest.
LOMO_HD uint16_t f32_to_bf16_stochastic(float x, uint32_t bits) {
  uint32_t b = f32_bits(x);
  uint32_t r = (b + (bits >> 16)) >> 16;
  return is_nan_bits(b) ? f32_to_bf16_nearest(x) : static_cast<uint16_t>(r);
}

// ------------------------------------------------------------------------------------------
// fp16 (IEEE binary16)
// ------------------------------------------------------------------------------------------
LOMO_HD float f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  return f16_bits_to_f32(h);
#endif
}

// Round to nearest even, as tensor.to(torch.float16); NaN -> the canonical quiet NaN (the GPU's
// conversion gives 0x7FFF: replaced).
LOMO_HD uint16_t f32_to_f16_nearest(float x) {
#if defined(__CUDA_ARCH__)
  const uint16_t h = __half_as_ushort(__float2half_rn(x));
  return is_nan_bits(f32_bits(x)) ? kF16CanonicalNaN : h;
#else
  return f32_to_f16_bits(x, kF16CanonicalNaN);
#endif
}

// 2**k as fp32 from its bit pattern (exact for -126 <= k <= 127).
LOMO_HD float pow2i(int32_t k) { return f32_from_bits(static_cast<uint32_t>(k + 127) << 23); }

// reference._sr_fp16: the fp16 grid spacing at |x| is 2**k, k = max(e - 10, -24); round |x| / 2**k
// down or up with probability given by its fraction, using 24 random bits. All steps are exact.
LOMO_HD uint16_t f32_to_f16_stochastic(float x, uint32_t bits) {
  uint32_t b = f32_bits(x);
  uint32_t a_bits = b & 0x7FFFFFFFu;
  float a = f32_from_bits(a_bits);
  int32_t e = static_cast<int32_t>(a_bits >> 23) - 127;
  int32_t k = e - 10 < -24 ? -24 : (e - 10 > 100 ? 100 : e - 10);
  float q = a * pow2i(-k);
  // q < 2**11 whenever the result is used; the guard keeps the int conversion defined for Inf/NaN.
  q = a < 65520.0f ? q : 0.0f;
  float f = static_cast<float>(static_cast<int32_t>(q));  // floor (q >= 0)
  float r = static_cast<float>(bits >> 8) * 5.9604644775390625e-08f;  // * 2**-24
  float y = (f + (r < q - f ? 1.0f : 0.0f)) * pow2i(k);
  y = y < 65504.0f ? y : 65504.0f;
  uint16_t sr = static_cast<uint16_t>(((b >> 16) & 0x8000u) | f32_to_f16_nearest(y));  // y exact
  // NaN and |x| >= 65520 round to nearest (NaN / Inf) as tensor.to does.
  return a < 65520.0f ? sr : f32_to_f16_nearest(x);
}

// ------------------------------------------------------------------------------------------
// Format-generic load (upcast) and store (downcast).
// ------------------------------------------------------------------------------------------
template <Fmt F> LOMO_HD float to_f32(storage_t<F> v);
template <> LOMO_HD float to_f32<Fmt::F32>(float v) { return v; }
template <> LOMO_HD float to_f32<Fmt::F16>(uint16_t v) { return f16_to_f32(v); }
template <> LOMO_HD float to_f32<Fmt::BF16>(uint16_t v) { return bf16_to_f32(v); }

// `bits` is only read for stochastic rounding of fp16/bf16 (fp32 stores are exact).
template <Fmt F, bool SR> LOMO_HD storage_t<F> from_f32(float x, uint32_t bits);
template <> LOMO_HD float from_f32<Fmt::F32, false>(float x, uint32_t) { return x; }
template <> LOMO_HD float from_f32<Fmt::F32, true>(float x, uint32_t) { return x; }
template <> LOMO_HD uint16_t from_f32<Fmt::F16, false>(float x, uint32_t) {
  return f32_to_f16_nearest(x);
}
template <> LOMO_HD uint16_t from_f32<Fmt::F16, true>(float x, uint32_t bits) {
  return f32_to_f16_stochastic(x, bits);
}
template <> LOMO_HD uint16_t from_f32<Fmt::BF16, false>(float x, uint32_t) {
  return f32_to_bf16_nearest(x);
}
template <> LOMO_HD uint16_t from_f32<Fmt::BF16, true>(float x, uint32_t bits) {
  return f32_to_bf16_stochastic(x, bits);
}

}  // namespace lomo
