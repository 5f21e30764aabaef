// fp32 bit patterns and the fp16/bf16 <-> fp32 conversions in plain integer and fp32 arithmetic
// (round to nearest even), shared by rounding.h (the host side of every kernel's up/down-casts) and
// cuda/emulation.h (the GPU's conversion intrinsics on the CPU). It includes nothing of this project,
// so that neither of those two headers includes the other.
//
// Everything is branch-free so that CPU loops auto-vectorise; nothing depends on the FP rounding
// mode except the fp32 additions used as exact "round to the fp16 subnormal grid" steps.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LOMO_HD __host__ __device__ __forceinline__
#else
#define LOMO_HD inline __attribute__((always_inline))
#endif

namespace lomo {

// The quiet NaN every backend stores for a NaN result in fp16 / bf16 (docs/spec.md, "Rounding on
// the way down"): the pattern of torch.tensor(float("nan"), dtype=...), positive, no payload.
constexpr uint16_t kF16CanonicalNaN = 0x7E00u;
constexpr uint16_t kBF16CanonicalNaN = 0x7FC0u;
// What the GPU's conversion instructions (cvt.rn.f16.f32, cvt.rn.bf16.f32) give for any NaN.
constexpr uint16_t kGpuCvtNaN = 0x7FFFu;

LOMO_HD uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
#endif
}

LOMO_HD float f32_from_bits(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, 4);
  return x;
#endif
}

// Finite test on the bit pattern: independent of -ffinite-math style assumptions.
LOMO_HD bool is_finite_f32(float x) { return (f32_bits(x) & 0x7F800000u) != 0x7F800000u; }

// NaN test on an fp32 bit pattern. A signed comparison (|b| < 2**31): one instruction in a
// vectorised CPU loop, where an unsigned one takes two or three before AVX-512.
LOMO_HD bool is_nan_bits(uint32_t b) {
  return static_cast<int32_t>(b & 0x7FFFFFFFu) > 0x7F800000;
}

LOMO_HD float bf16_bits_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, as tensor.to(torch.bfloat16) does for numbers; NaN -> `nan`.
LOMO_HD uint16_t f32_to_bf16_bits(float x, uint16_t nan) {
  uint32_t b = f32_bits(x);
  uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(is_nan_bits(b) ? nan : r);
}

// IEEE binary16 -> fp32, exact.
LOMO_HD float f16_bits_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t em = h & 0x7FFFu;
  // normal: rebias the exponent by 127-15; Inf/NaN: exponent field all ones.
  uint32_t normal = (em << 13) + (em >= 0x7C00u ? 0x70000000u : 0x38000000u);
  // subnormal/zero: em * 2**-24, exact as (0.5 + em * 2**-24) - 0.5 in fp32.
  float sub = f32_from_bits(0x3F000000u + em) - 0.5f;
  return f32_from_bits(sign | (em < 0x0400u ? f32_bits(sub) : normal));
}

// Round to nearest even, as tensor.to(torch.float16) does for numbers; NaN -> `nan`.
LOMO_HD uint16_t f32_to_f16_bits(float x, uint16_t nan) {
  uint32_t b = f32_bits(x);
  uint32_t sign = (b >> 16) & 0x8000u;
  uint32_t a = b & 0x7FFFFFFFu;
  // |x| < 2**-14 (fp16 subnormal range): adding 0.5 rounds |x| to a multiple of 2**-24 (the ulp
  // of 0.5 in fp32), i.e. to the fp16 subnormal grid, with the FPU's round-to-nearest-even.
  uint32_t sub = f32_bits(f32_from_bits(a) + 0.5f) - 0x3F000000u;
  // normal: drop 13 mantissa bits with round-to-nearest-even, rebias the exponent (127 -> 15).
  uint32_t nor = (a + 0x0FFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
  uint32_t h = a < 0x38800000u ? sub : nor;
  h = a >= 0x477FF000u ? 0x7C00u : h;  // |x| >= 65520 rounds to Inf
  h = sign | h;
  return static_cast<uint16_t>(a > 0x7F800000u ? nan : h);
}

}  // namespace lomo
