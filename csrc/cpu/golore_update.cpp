// GoLore / GaLore inner optimizer on the CPU (reference.golore_update_): element-wise over r,
// float32 state, two passes.
//
//   pass 1: is any element of r NaN/Inf?   (per-unit flags, read in unit order)
//   pass 2: new state and N; projected mode: r = N; full-rank mode: p = round(p*decay - lr*s*N).
// A non-finite r leaves p and the state untouched (projected mode: r is filled with NaN so that
// nothing computed from it can be applied), and sets found_inf. On the CPU the flag between the
// passes is a host bool: no device to keep busy.
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_vec.h"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace cpu {
namespace {

template <Inner I, bool FULL>
struct GoloreCtx {
  GoloreScalars s;
  float coef;     // clip_coef, 1 when off
  const void* r;  // float32 (projected) or, full rank, the gradient (param's dtype or float32)
  float* out;     // projected mode: N is written over r
  void* p;        // full-rank mode: the parameter
  float *m, *v, *buf;
  int64_t n;
  uint8_t* bad;  // [units] pass 1 flags
};

// Pass 1 over one unit: a non-finite r element (checked on the raw value, before clip_coef).
template <class K, int W, Inner I, bool FULL>
LOMO_CPU_INLINE void golore_check_chunk(const GoloreCtx<I, FULL>& c, int64_t unit) {
  using SG = storage_t<K::GF>;
  const int64_t begin = unit * kChunk;
  const int64_t len = std::min(c.n, begin + kChunk) - begin;
  const SG* __restrict r = static_cast<const SG*>(c.r) + begin;
  uint32_t bad = 0;
  for (int64_t j = 0; j < len; ++j) bad |= is_finite_f32(to_f32<K::GF>(r[j])) ? 0u : 1u;
  c.bad[unit] = static_cast<uint8_t>(bad);
}
LOMO_CPU_CLONES(golore_check_chunk)

// Pass 2 over one unit (only when every element is finite).
template <class K, int W, Inner I, bool FULL>
LOMO_CPU_INLINE void golore_apply_chunk(const GoloreCtx<I, FULL>& c, int64_t unit) {
  constexpr Fmt F = K::F;
  constexpr bool SR = K::SR;
  using S = storage_t<F>;
  const GoloreScalars s = c.s;
  const float coef = c.coef;
  int64_t begin = unit * kChunk;
  const int64_t end = std::min(c.n, begin + kChunk);
  while (begin < end) {
    // The hash's high half is constant up to the next multiple of 2**32.
    const int64_t stop = std::min(end, ((begin >> 32) + 1) << 32);
    const uint32_t hk = hash_high_key(s.key, static_cast<uint64_t>(begin));
    const uint32_t lo = static_cast<uint32_t>(begin);
    const storage_t<K::GF>* __restrict r = static_cast<const storage_t<K::GF>*>(c.r) + begin;
    float* __restrict m = I == Inner::AdamW ? c.m + begin : nullptr;
    float* __restrict v = I == Inner::AdamW ? c.v + begin : nullptr;
    float* __restrict buf = I == Inner::SgdMomentum ? c.buf + begin : nullptr;
    float* __restrict out = FULL ? nullptr : c.out + begin;
    S* __restrict p = FULL ? static_cast<S*>(c.p) + begin : nullptr;
    const int64_t len = stop - begin;
    // element j's new state and N
    const auto direction = [&](int64_t j) __attribute__((always_inline)) {
      const float g = to_f32<K::GF>(r[j]) * coef;
      float mj = 0.0f, vj = 0.0f, bj = 0.0f;
      if constexpr (I == Inner::AdamW) {
        mj = m[j];
        vj = v[j];
      }
      if constexpr (I == Inner::SgdMomentum) bj = buf[j];
      const float nv = golore_direction<I>(s, g, mj, vj, bj);
      if constexpr (I == Inner::AdamW) {
        m[j] = mj;
        v[j] = vj;
      }
      if constexpr (I == Inner::SgdMomentum) buf[j] = bj;
      return nv;
    };
    const auto new_p = [&](int64_t j) __attribute__((always_inline)) {
      return __builtin_fmaf(direction(j), s.neg_lr_scale, to_f32<F>(p[j]) * s.decay);
    };
    if constexpr (!FULL) {
      for (int64_t j = 0; j < len; ++j) out[j] = direction(j);
    } else if constexpr (SR) {  // the new p in fp32 blocks, rounded in vectors
      store_sr_blocks<F, W>(p, len, lo, hk, new_p);
    } else {
      for (int64_t j = 0; j < len; ++j) p[j] = from_f32<F, false>(new_p(j), 0u);
    }
    begin = stop;
  }
}
LOMO_CPU_CLONES(golore_apply_chunk)

template <Inner I, bool FULL>
void run(const GoloreCtx<I, FULL>& ctx, at::ScalarType dtype, at::ScalarType grad_dtype,
         bool sr) {
  const int64_t units = ceil_div(ctx.n, kChunk);
  // golore_update_ has no loss scale: only the formats and stochastic rounding vary.
  dispatch_flags<kUseSR | kUseG32>(dtype, sr, false, false, false, true, [&](auto k) {
    using K = decltype(k);
    using Ctx = GoloreCtx<I, FULL>;
    run_units(golore_check_chunk_pick<K, Ctx>(), ctx, units);
    for (int64_t u = 0; u < units; ++u) {
      if (ctx.bad[u]) {
        if constexpr (!FULL)
          std::fill(ctx.out, ctx.out + ctx.n, std::numeric_limits<float>::quiet_NaN());
        return;
      }
    }
    run_units(golore_apply_chunk_pick<K, Ctx>(), ctx, units);
  }, grad_dtype);
}

}  // namespace
}  // namespace cpu

void golore_update_cpu(GOLORE_UPDATE_PARAMS) {
  const GoloreSetup c = golore_setup(GOLORE_UPDATE_ARGS);
  CHECK_CPU("golore_update_", r);
  const int64_t n = r.numel();
  if (n == 0) return;
  const float coef = clip_coef.has_value() ? clip_coef->data_ptr<float>()[0] : 1.0f;
  std::vector<uint8_t> bad(static_cast<size_t>(cpu::ceil_div(n, cpu::kChunk)), 0);
  const bool full = param.has_value();
  // Projected mode: r is float32 (the format the loops read it in) and receives N.
  const at::ScalarType dtype = full ? param->scalar_type() : at::kFloat;
  auto go = [&](auto inner_tag, auto full_tag) {
    constexpr Inner I = decltype(inner_tag)::value;
    constexpr bool FULL = decltype(full_tag)::value;
    cpu::GoloreCtx<I, FULL> ctx{c.s,
                                coef,
                                r.data_ptr(),
                                FULL ? nullptr : r.data_ptr<float>(),
                                FULL ? param->data_ptr() : nullptr,
                                float_ptr(exp_avg),
                                float_ptr(exp_avg_sq),
                                float_ptr(momentum_buffer),
                                n,
                                bad.data()};
    cpu::run(ctx, dtype, r.scalar_type(), FULL && c.stochastic);
  };
  auto with_full = [&](auto inner_tag) {
    if (full)
      go(inner_tag, std::true_type{});
    else
      go(inner_tag, std::false_type{});
  };
  switch (c.kind) {
    case Inner::AdamW: with_full(std::integral_constant<Inner, Inner::AdamW>{}); break;
    case Inner::SgdMomentum:
      with_full(std::integral_constant<Inner, Inner::SgdMomentum>{});
      break;
    case Inner::Sgd: with_full(std::integral_constant<Inner, Inner::Sgd>{}); break;
  }
  bool any_bad = false;
  for (uint8_t b : bad) any_bad |= b != 0;
  if (any_bad && found_inf.has_value()) found_inf->data_ptr<float>()[0] = 1.0f;
}

}  // namespace lomo
