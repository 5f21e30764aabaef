// AdaLomo on the CPU for unfactored parameters (0-d / 1-d; docs/spec.md), single and
// multi-tensor. Two passes: u depends on this element's v only, so stage 1 sums u*u as well
// (v' computed, not stored) and stage 3 recomputes v' and stores it with p; stage 2 only
// publishes sum(u*u) in the header. The single-tensor op is the multi-tensor op's code for one
// tensor (the same chunks of kChunk elements and the same sums), so a tensor gets bitwise the
// same update either way.
#include <cmath>
#include <cstring>

#include "checks.h"
#include "cpu/adalomo_cpu.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_vec.h"
#include "cpu/cpu_workspace.h"
#include "ops.h"

namespace lomo {
namespace cpu {
namespace {

// ================================ unfactored parameters ======================================
struct FlatTensor;
using FlatFn = void (*)(const FlatTensor&, int64_t);

struct FlatTensor {
  AdaLomoScalars s;
  float coef;
  void* p;
  const void* g;
  float* v;
  int64_t n;
  Slot* slots;  // [units of this tensor]
  AdaStep st;
  FlatFn stats, apply;
};

// v' = beta * v + (1 - beta) * G (torch.add(v * b, G, alpha=1-b): one fma), u = rsqrt(v') * g.
template <Fmt F, bool DIV>
LOMO_CPU_INLINE float flat_u(const AdaLomoScalars& s, float coef, float v, float graw,
                             float* v_new) {
  const float gv = preprocess<DIV>(graw, s.scale, s.clip, coef);
  const float G = gv * gv + s.eps1;
  const float vn = __builtin_fmaf(G, s.one_minus_beta, v * s.beta);
  *v_new = vn;
  return (1.0f / std::sqrt(vn)) * gv;
}

// Stage-1 pass of a chunk: non-finite flag, sum(p*p), sum(u*u) and sum((g/ls)**2). The
// element-wise part is a plain vectorised loop into fp32 staging blocks (u needs sqrt), summed
// by the 16-lane reduction.
template <class K, int W>
LOMO_CPU_INLINE void flat_stats(const FlatTensor& c, int64_t unit) {
  constexpr Fmt F = K::F;
  using S = storage_t<F>;
  using SG = storage_t<K::GF>;
  const int64_t begin = unit * kChunk, len = std::min(c.n - begin, kChunk);
  const SG* __restrict g = static_cast<const SG*>(c.g) + begin;
  const S* __restrict p = static_cast<const S*>(c.p) + begin;
  const float* __restrict v = c.v + begin;
  const AdaLomoScalars s = c.s;  // a local copy: no aliasing with the staging stores
  const float coef = c.coef;
  alignas(64) float pb[kBlock], ub[kBlock], qb[kBlock];
  DAcc<W> pp, uu, gq;
  uint32_t bad = 0;
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t bl = std::min(kBlock, len - b);
    for (int64_t j = 0; j < bl; ++j) {
      const float graw = to_f32<K::GF>(g[b + j]);
      bad |= is_finite_f32(graw) ? 0u : 1u;
      float vn;
      ub[j] = flat_u<F, K::DIV>(s, coef, v[b + j], graw, &vn);
      pb[j] = to_f32<F>(p[b + j]);
      if constexpr (K::GSQ) qb[j] = K::DIV ? graw / s.scale : graw * s.scale;
    }
    add_squares_block(pp, pb, bl);
    add_squares_block(uu, ub, bl);
    if constexpr (K::GSQ) add_squares_block(gq, qb, bl);
  }
  c.slots[unit] = Slot{pp.sum(), K::GSQ ? gq.sum() : 0.0, uu.sum(), bad};
}
LOMO_CPU_CLONES(flat_stats)

// Stage-3 pass of a chunk: recompute v' and u, store v' and p (stochastic rounding: the new p in
// fp32 blocks, rounded in vectors).
template <class K, int W>
LOMO_CPU_INLINE void flat_apply(const FlatTensor& c, int64_t unit) {
  constexpr Fmt F = K::F;
  using S = storage_t<F>;
  const int64_t begin = unit * kChunk, len = std::min(c.n - begin, kChunk);
  // kChunk divides 2**32: a chunk never crosses a change of the hash's high half.
  const uint32_t hk = hash_high_key(c.s.key, static_cast<uint64_t>(begin));
  const uint32_t lo = static_cast<uint32_t>(begin);
  const storage_t<K::GF>* __restrict g = static_cast<const storage_t<K::GF>*>(c.g) + begin;
  S* __restrict p = static_cast<S*>(c.p) + begin;
  float* __restrict v = c.v + begin;
  const AdaLomoScalars s = c.s;
  const float coef = c.coef;
  const float denom = c.st.denom, decay = c.st.decay, lr_t = c.st.lr_t;
  const auto new_p = [&](int64_t j) __attribute__((always_inline)) {  // and store v'
    float vn;
    const float u = flat_u<F, K::DIV>(s, coef, v[j], to_f32<K::GF>(g[j]), &vn);
    v[j] = vn;
    return apply_value<F, K::DEN1>(denom, decay, lr_t, p[j], u);
  };
  if constexpr (K::SR) {
    store_sr_blocks<F, W>(p, len, lo, hk, new_p);
  } else {
    for (int64_t j = 0; j < len; ++j) p[j] = from_f32<F, false>(new_p(j), 0u);
  }
}
LOMO_CPU_CLONES(flat_apply)

// The scratch of unfactored tensors (Slot per unit) and, for one tensor, sum(u*u) kept from
// stage 1 for stage 2.
using FlatScratch = TensorScratch<FlatTensor, Slot>;

int64_t flat_numel(int64_t k, int64_t units, bool multi) {
  Carver cv;
  carve_tensors<FlatTensor, Slot>(cv, k, units, multi);
  if (!multi) cv.take<double>(1);
  return scratch_numel(kHeader, cv.bytes());
}

// Passes over the units of all k tensors in one parallel region (parallel_phases): phase i is the
// apply pass if apply[i], else the stats pass; a tensor whose function is null (a non-finite
// gradient: no apply) is skipped. between(i) runs after phase i, on one thread.
template <class Between>
void run_flat(const FlatTensor* t, const int64_t* first, int64_t k, int n, const bool* apply,
              const Between& between) {
  parallel_phases(
      n, [&](int) { return first[k]; },
      [&](int i, int64_t u) {
        const int64_t j = k == 1 ? 0 : tensor_of_unit(first, k, u);
        const FlatFn fn = apply[i] ? t[j].apply : t[j].stats;
        if (fn) fn(t[j], u - first[j]);
      },
      between);
}

struct FlatSums {
  double pp, gsq, uu;
  bool bad;
};

FlatSums flat_sums(const FlatTensor& t, int64_t units) {
  FlatSums r{0.0, 0.0, 0.0, false};
  for (int64_t u = 0; u < units; ++u) {
    r.pp += t.slots[u].pp;
    r.gsq += t.slots[u].gsq;
    r.uu += t.slots[u].uu;
    r.bad |= t.slots[u].bad != 0;
  }
  return r;
}

// The stats and apply loops of one tensor for its dtype and the call's flags (apply: chosen
// once denom is known).
FlatFn pick_flat_stats(at::ScalarType dtype, at::ScalarType grad_dtype, bool div, bool gsq) {
  FlatFn fn = nullptr;
  dispatch_flags<kUseDIV | kUseGSQ | kUseG32>(
      dtype, false, div, gsq, false, true,
      [&](auto k) { fn = flat_stats_pick<decltype(k), FlatTensor>(); }, grad_dtype);
  return fn;
}

FlatFn pick_flat_apply(at::ScalarType dtype, at::ScalarType grad_dtype, bool sr, bool div,
                       bool den1) {
  FlatFn fn = nullptr;
  dispatch_flags<kUseSR | kUseDIV | kUseDEN1 | kUseG32>(
      dtype, sr, div, false, den1, true,
      [&](auto k) { fn = flat_apply_pick<decltype(k), FlatTensor>(); }, grad_dtype);
  return fn;
}


}  // namespace

int64_t flat_workspace_numel(int64_t k, int64_t units, bool multi) {
  return flat_numel(k, units, multi);
}

void flat_adalomo(const AdaCall& a, const at::Tensor& param, const at::Tensor& grad, float* v,
                  const std::optional<at::Tensor>& workspace) {
  const int64_t numel = param.numel(), units = ceil_div(numel, kChunk);
  Scratch scratch("adalomo_update_", workspace, flat_numel(1, units, false));
  Carver cv = scratch.carver(kHeader);
  const FlatScratch w = carve_tensors<FlatTensor, Slot>(cv, 1, units, false);
  double* uu = cv.take<double>(1);
  float* h = scratch.header();
  const at::ScalarType dtype = param.scalar_type(), grad_dtype = grad.scalar_type();
  FlatTensor t{a.s, a.coef, param.data_ptr(), grad.data_ptr(), v, numel, w.parts, AdaStep{},
               nullptr, nullptr};
  const int64_t first[2] = {0, units};
  const auto prepare_apply = [&] {
    t.st = step_scalars(a.s, h[0], h[2], a.numel_g);
    t.apply = pick_flat_apply(dtype, grad_dtype, a.sr, a.div, t.st.denom == 1.0f);
  };
  if (a.stage == 2) {
    h[2] = h[1] > 0 ? 0.0f : static_cast<float>(*uu);
    return;
  }
  if (a.stage == 3) {
    if (h[1] > 0) return set_found(a.found);
    prepare_apply();
    const bool apply[1] = {true};
    return run_flat(&t, first, 1, 1, apply, [](int) {});
  }
  t.stats = pick_flat_stats(dtype, grad_dtype, a.div, a.grad_sq != nullptr);
  const bool apply[2] = {false, true};
  run_flat(&t, first, 1, a.stage == 0 ? 2 : 1, apply, [&](int i) {
    if (i == 1) return;
    const FlatSums sums = flat_sums(t, units);
    h[0] = static_cast<float>(sums.pp);
    h[1] = sums.bad ? 1.0f : 0.0f;
    *uu = sums.uu;
    if (a.grad_sq && units) a.grad_sq[0] += static_cast<float>(sums.gsq);
    if (a.stage == 1) return;
    if (h[1] > 0) return set_found(a.found);  // t.apply stays null: no apply
    h[2] = static_cast<float>(*uu);
    prepare_apply();
  });
}

}  // namespace cpu

void adalomo_update_multi_cpu(ADALOMO_UPDATE_MULTI_PARAMS) {
  using namespace cpu;
  constexpr const char* op = "adalomo_update_multi_";
  const int64_t k = static_cast<int64_t>(params.size());
  check_multi_lists(op, params, grads,
                    {&lr, &weight_decay, &clip_grad_value, &beta, &eps1, &eps2, &clip_threshold},
                    {&seed, &step});
  TORCH_CHECK(exp_avg_sqs.size() == params.size(), op, ": ", k, " params but ",
              exp_avg_sqs.size(), " exp_avg_sqs");
  int64_t units = 0;
  for (int64_t i = 0; i < k; ++i) {
    check_common(op, params[i], grads[i], clip_coef, found_inf);
    CHECK_CPU(op, params[i]);
    check_scalar_out(op, "grad_sq", grad_sq, params[i]);
    TORCH_CHECK(params[i].dim() <= 1, op, ": takes 0-d and 1-d tensors only, got shape ",
                params[i].sizes());
    check_adalomo_state(params[i], std::nullopt, std::nullopt, exp_avg_sqs[i]);
    units += ceil_div(params[i].numel(), kChunk);
  }
  const bool sr = parse_rounding(op, rounding);
  if (k == 0) return;
  Scratch scratch(op, workspace, flat_numel(k, units, true));
  Carver cv = scratch.carver(kHeader);
  const FlatScratch w = carve_tensors<FlatTensor, Slot>(cv, k, units, true);
  const float coef = clip_coef.has_value() ? clip_coef->data_ptr<float>()[0] : 1.0f;
  float* gs = grad_sq.has_value() ? grad_sq->data_ptr<float>() : nullptr;
  units = 0;
  for (int64_t i = 0; i < k; ++i) {
    const Preprocess pre = make_preprocess(loss_scale, clip_grad_value[i]);
    w.tensors[i] = FlatTensor{
        make_adalomo_scalars(pre, lr[i], weight_decay[i], beta[i], eps1[i], eps2[i],
                             clip_threshold[i], seed[i], step[i]),
        coef, params[i].data_ptr(), grads[i].data_ptr(), exp_avg_sqs[i].data_ptr<float>(),
        params[i].numel(), w.parts + units, AdaStep{},
        pick_flat_stats(params[i].scalar_type(), grads[i].scalar_type(), pre.divide,
                        gs != nullptr),
        nullptr};
    w.first[i] = units;
    units += ceil_div(params[i].numel(), kChunk);
  }
  w.first[k] = units;
  bool any_bad = false;
  const bool apply[2] = {false, true};
  run_flat(w.tensors, w.first, k, 2, apply, [&](int phase) {
    if (phase == 1) return;
    for (int64_t i = 0; i < k; ++i) {  // as each single-tensor op would, in list order
      FlatTensor& t = w.tensors[i];
      const int64_t n_units = w.first[i + 1] - w.first[i];
      if (n_units == 0) continue;
      const FlatSums sums = flat_sums(t, n_units);
      if (gs) gs[0] += static_cast<float>(sums.gsq);
      if (sums.bad) {
        any_bad = true;
        continue;
      }
      t.st = step_scalars(t.s, static_cast<float>(sums.pp), static_cast<float>(sums.uu), t.n);
      const Preprocess pre = make_preprocess(loss_scale, clip_grad_value[i]);
      t.apply = pick_flat_apply(params[i].scalar_type(), grads[i].scalar_type(), sr, pre.divide,
                                t.st.denom == 1.0f);
    }
  });
  if (any_bad) set_found(found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr);
}

}  // namespace lomo
