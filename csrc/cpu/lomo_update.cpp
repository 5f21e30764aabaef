// LOMO on the CPU: p = p * (1 - lr * wd) - lr * g, one pass, fp32 math, in place (SPEC.md).
#include <atomic>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace cpu {
namespace {

struct LomoCtx {
  LomoScalars s;
  float coef;  // clip_coef, 1 when global-norm clipping is off
  void* p;
  const void* g;
  int64_t n;
  std::atomic<int>* found;  // set to 1 when a gradient element is non-finite
};

// Elements [begin, end): one chunk. Elements whose raw gradient is NaN/Inf keep their value.
template <Fmt F, bool SR, bool DIV>
LOMO_CPU_INLINE void lomo_chunk(const LomoCtx& c, int64_t unit) {
  using S = storage_t<F>;
  const LomoScalars s = c.s;
  const float coef = c.coef;
  int64_t begin = unit * kChunk;
  const int64_t end = std::min(c.n, begin + kChunk);
  uint32_t bad = 0;
  while (begin < end) {
    // The hash's high half is constant up to the next multiple of 2**32.
    const int64_t stop = std::min(end, ((begin >> 32) + 1) << 32);
    const uint32_t hk = hash_high_key(s.key, static_cast<uint64_t>(begin));
    const uint32_t lo = static_cast<uint32_t>(begin);
    S* __restrict p = static_cast<S*>(c.p) + begin;
    const S* __restrict g = static_cast<const S*>(c.g) + begin;
    const int64_t len = stop - begin;
    for (int64_t j = 0; j < len; ++j) {
      const float graw = to_f32<F>(g[j]);
      const bool ok = is_finite_f32(graw);
      const float gv = preprocess<DIV>(graw, s.scale, s.clip, coef);
      const float pv = to_f32<F>(p[j]);
      const float nv = __builtin_fmaf(gv, s.neg_lr, pv * s.decay);
      const uint32_t bits = SR ? mix32((lo + static_cast<uint32_t>(j)) ^ hk) : 0u;
      const S out = from_f32<F, SR>(nv, bits);
      p[j] = ok ? out : p[j];
      bad |= ok ? 0u : 1u;
    }
    begin = stop;
  }
  if (bad) c.found->store(1, std::memory_order_relaxed);
}
LOMO_CPU_CLONES(lomo_chunk)

}  // namespace
}  // namespace cpu

void lomo_update_cpu(LOMO_UPDATE_PARAMS) {
  constexpr const char* op = "lomo_update_";
  check_common(op, param, grad, clip_coef, found_inf);
  check_not_implemented(op, grad_sq);
  CHECK_CPU(op, param);
  const bool sr = parse_rounding(op, rounding);
  const int64_t n = param.numel();
  if (n == 0) return;

  const Preprocess pre = make_preprocess(loss_scale, clip_grad_value);
  std::atomic<int> found{0};
  cpu::LomoCtx ctx{make_lomo_scalars(pre, lr, weight_decay, seed, step),
                   clip_coef.has_value() ? clip_coef->data_ptr<float>()[0] : 1.0f,
                   param.data_ptr(), grad.data_ptr(), n, &found};
  cpu::dispatch_flags(param.scalar_type(), sr, pre.divide, [&](auto f, auto sr_t, auto div_t) {
    auto fn = cpu::lomo_chunk_pick<decltype(f)::value, decltype(sr_t)::value,
                                   decltype(div_t)::value, cpu::LomoCtx>();
    cpu::parallel_units(cpu::ceil_div(n, cpu::kChunk), [&](int64_t u) { fn(ctx, u); });
  });
  if (found.load() && found_inf.has_value()) found_inf->data_ptr<float>()[0] = 1.0f;
}

}  // namespace lomo
