// LOMO on the CPU: p = p * (1 - lr * wd) - lr * g, one pass, fp32 math, in place (docs/spec.md).
// The single-tensor op is the multi-tensor op with one tensor: both run the same chunks and sum
// the same partials, so a tensor gets bitwise the same update either way.
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/bf16_pairs.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_vec.h"
#include "cpu/cpu_workspace.h"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace cpu {
namespace {

// Whether any lane of a is NaN (one test per block of the fast path, not per element).
template <int W>
LOMO_CPU_INLINE bool any_nan_lane(const Lanes<W>& a) {
  typename Vec<W>::F s = a.v[0];
  for (int q = 1; q < Lanes<W>::P; ++q) s += a.v[q];
  float x[W];
  std::memcpy(x, &s, sizeof x);
  float t = 0.0f;
  for (int k = 0; k < W; ++k) t += x[k];  // NaN iff some lane is (the lanes hold 0 or NaN)
  return t != t;
}

struct LomoTensor;
using LomoFn = void (*)(const LomoTensor&, int64_t);

struct LomoTensor {
  LomoScalars s;
  float coef;  // clip_coef, 1 when global-norm clipping is off
  void* p;
  const void* g;
  int64_t n;
  double* gsq;              // [units] partial sums of (g / loss_scale)**2, when asked for
  std::atomic<int>* found;  // set to 1 when a gradient element is non-finite
  LomoFn fn;                // the chunk loop for this tensor's dtype and flags
  // A finite fp32 lr and every multiplier of at most 1 in magnitude (loss scale, clip_coef,
  // 1 - lr * weight_decay): finite p and g then give a finite or infinite nv (one fma of finite
  // operands), never NaN.
  bool fast;
};

// Chunk `unit` of one tensor. Elements whose raw gradient is NaN/Inf keep their value.
//
// Per block of kBlock elements (the squared gradient's fp32 accumulation block): when the call
// allows it (LomoTensor::fast), the block's whole groups of 16 go in explicit vectors without the
// per-element guard, flag and NaN select, with the squared gradient summed in the same pass; a
// multiplier of exactly 1 (no loss scale, no weight decay) is left out; stochastic rounding
// hashes the element indices in the same vectors. Whether the block held NaN/Inf is decided after
// it: without value clipping a NaN/Inf in p or g makes its new value NaN/Inf (as does an overflow
// of finite ones), and z = fma(new, 0, z) turns NaN then. The block's p as loaded is kept (one
// vector store per group, from the register the loop loads anyway); a block whose z is NaN gets
// it back and takes the guarded loop. Value clipping maps Inf to a finite value, so there each
// run of kRun elements is checked on the stored words first. Deciding after the block leaves out
// that scan (two loads and four vector operations per 16 elements) and the per-run bookkeeping,
// together a fifth of the instructions (bf16, AVX2). Either way the squared gradient goes into the
// same lanes in the same order: the results are bitwise those of the guarded loop.
template <class K, int W>
LOMO_CPU_INLINE void lomo_chunk(const LomoTensor& c, int64_t unit) {
  constexpr Fmt F = K::F;
  using S = storage_t<F>;
  using SG = storage_t<K::GF>;  // the gradient: S, or float32 (an accumulation buffer)
  using G = GroupOf<F, K::GF, W>;  // bf16 p and g on AVX2: no shuffles (bf16_pairs.h)
  using VF = typename Vec<W>::F;
  // one group's stored words as one value (a vector store, where memcpy made two 16-byte copies)
  typedef S SV __attribute__((vector_size(kLanes * sizeof(S))));
  constexpr int64_t kRun = kPrefetchRun;
  const LomoScalars s = c.s;
  const float coef = c.coef;
  const int64_t begin = unit * kChunk;
  const int64_t len = std::min(c.n - begin, kChunk);
  // kChunk divides 2**32: the hash's high half is constant over a chunk.
  const uint32_t hk = hash_high_key(s.key, static_cast<uint64_t>(begin));
  const uint32_t lo = static_cast<uint32_t>(begin);
  S* __restrict p = static_cast<S*>(c.p) + begin;
  const SG* __restrict g = static_cast<const SG*>(c.g) + begin;
  uint32_t bad = 0;
  DAcc<W> gsq;
  // The 16-element groups in [b, e) (a multiple of 16 long) as if they held no NaN/Inf, in
  // vectors, in runs of kRun elements that each prefetch the run kPrefetchAhead further on; the
  // squared gradient into acc in G's lane order; a literal 1 for scale / decay folds the
  // multiply away (x * 1 == x). Without value clipping, also p as loaded into `save` and
  // z = fma(new p, 0, z) per lane (NaN once a new value is NaN/Inf).
  const auto clean_groups = [&](Lanes<W>& acc, Lanes<W>& z, SV* save, int64_t b, int64_t e,
                                float scale, float decay) __attribute__((always_inline)) {
    const VPre<K::DIV, W, K::CLIP> pre(scale, s.clip, coef);
    const VF neg_lr = splat<W>(s.neg_lr), dec = splat<W>(decay), zero{};
    Lanes<W> a = acc, y = z;  // locals stay in registers (save's stores could alias acc and z)
    for (int64_t r = b; r < e; r += kRun) {
      prefetch_run_ahead<1>(p + r);  // cpu_vec.h
      prefetch_run_ahead<0>(g + r);
      const int64_t re = std::min(e, r + kRun);
      for (int64_t j = r; j < re; j += kLanes) {
        VF gv[G::P], pv[G::P];
        group_of_load<F, K::GF, W>(g + j, gv);
        if constexpr (!K::CLIP) {
          SV w;
          std::memcpy(&w, p + j, sizeof w);
          *save++ = w;
        }
        G::load(p + j, pv);
        for (int q = 0; q < G::P; ++q) {
          const VF gu = pre.unscale(gv[q]);
          if constexpr (K::GSQ) a.v[q] += gu * gu;
          pv[q] = vfma<W>(pre.clip_coef(gu), neg_lr, pv[q] * dec);
          if constexpr (!K::CLIP) y.v[q] = vfma<W>(pv[q], zero, y.v[q]);
        }
        G::template store_clean<K::SR>(p + j, pv, lo + static_cast<uint32_t>(j), hk);
      }
    }
    acc = a;
    z = y;
  };
  // The guarded loop over [b, e): an element whose gradient is NaN/Inf keeps its value.
  const auto guarded = [&](int64_t b, int64_t e) __attribute__((always_inline)) {
    for (int64_t j = b; j < e; ++j) {  // auto-vectorised
      const float graw = to_f32<K::GF>(g[j]);
      const bool ok = is_finite_f32(graw);
      const float gv = preprocess<K::DIV, K::CLIP>(graw, s.scale, s.clip, coef);
      const float pv = to_f32<F>(p[j]);
      const float nv = __builtin_fmaf(gv, s.neg_lr, pv * s.decay);
      const uint32_t bits = K::SR ? mix32((lo + static_cast<uint32_t>(j)) ^ hk) : 0u;
      const S out = from_f32<F, K::SR>(nv, bits);
      p[j] = ok ? out : p[j];
      bad |= ok ? 0u : 1u;
    }
  };
  // The squared gradient of the groups in [b, e) into acc in G's lane order (the guarded
  // runs: the same sums as clean_groups'); `add_tail`: a last partial group, in element order.
  const VPre<K::DIV, W> unscale(s.scale, s.clip, coef);
  const auto add_gsq = [&](Lanes<W>& acc, int64_t b, int64_t e) __attribute__((always_inline)) {
    for (int64_t j = b; j < e; j += kLanes) {
      VF gv[G::P];
      group_of_load<F, K::GF, W>(g + j, gv);
      for (int q = 0; q < G::P; ++q) {
        const VF u = unscale.unscale(gv[q]);
        acc.v[q] += u * u;
      }
    }
  };
  const auto add_tail = [&](Lanes<W>& acc, int64_t j, int64_t e) __attribute__((always_inline)) {
    const auto u = Padded<K::GF>(g + j, e - j);  // zeros add nothing
    for (int q = 0; q < Lanes<W>::P; ++q) {
      const auto x = unscale.unscale(vload<K::GF, W>(u.v + q * W));
      acc.v[q] += x * x;
    }
  };
  const bool scale1 = s.scale == 1.0f, decay1 = s.decay == 1.0f;
  const auto clean = [&](Lanes<W>& acc, Lanes<W>& z, SV* save, int64_t b, int64_t e)
                         __attribute__((always_inline)) {
    if (scale1 && decay1)
      clean_groups(acc, z, save, b, e, 1.0f, 1.0f);
    else if (scale1)
      clean_groups(acc, z, save, b, e, 1.0f, s.decay);
    else if (decay1)
      clean_groups(acc, z, save, b, e, s.scale, 1.0f);
    else
      clean_groups(acc, z, save, b, e, s.scale, s.decay);
  };
  // the partial group at the end of a block: the element-wise formula, or the guarded loop
  const auto tail = [&](int64_t b, int64_t e) __attribute__((always_inline)) {
    if (any_non_finite<K::GF, F>(g + b, p + b, e - b)) return guarded(b, e);
    for (int64_t i = b; i < e; ++i) {
      const float gv = preprocess<K::DIV, K::CLIP>(to_f32<K::GF>(g[i]), s.scale, s.clip, coef);
      p[i] = round_clean<F, K::SR>(__builtin_fmaf(gv, s.neg_lr, to_f32<F>(p[i]) * s.decay),
                                   lo + static_cast<uint32_t>(i), hk);
    }
  };
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t e = std::min(kBlock, len - b) + b;
    const int64_t full = b + (e - b) / kLanes * kLanes;  // the end of the whole groups
    Lanes<W> acc, z;
    if (c.fast && !K::CLIP) {
      SV save[kBlock / kLanes];
      clean(acc, z, save, b, full);
      if (any_nan_lane(z)) [[unlikely]] {
        // NaN/Inf in the block: its p back, then the guarded loop (the sums are in acc)
        std::memcpy(p + b, save, static_cast<size_t>(full - b) * sizeof(S));
        guarded(b, full);
      }
      if (full < e) tail(full, e);
    } else {
      for (int64_t r = b; r < e; r += kRun) {
        const int64_t re = std::min(e, r + kRun), rf = std::min(full, re);
        // value clipping (it maps Inf to a finite value): the stored words checked first
        if (K::CLIP && c.fast && !any_non_finite<K::GF, F>(g + r, p + r, re - r)) {
          clean(acc, z, nullptr, r, rf);  // prefetches its run
          if (rf < re) tail(rf, re);
        } else {
          prefetch_run_ahead<1>(p + r);
          prefetch_run_ahead<0>(g + r);
          guarded(r, re);
          if constexpr (K::GSQ) add_gsq(acc, r, rf);  // the run's g is still in L1
        }
      }
    }
    if constexpr (K::GSQ) {
      acc = G::logical(acc);
      if (full < e) add_tail(acc, full, e);
      gsq.add(acc);
    }
  }
  if constexpr (K::GSQ) c.gsq[unit] = gsq.sum();
  if (bad) c.found->store(1, std::memory_order_relaxed);
}
LOMO_CPU_CLONES(lomo_chunk)

LomoFn pick_lomo(at::ScalarType dtype, at::ScalarType grad_dtype, bool sr, bool div, bool gsq,
                 bool clip) {
  LomoFn fn = nullptr;
  dispatch_flags<kUseSR | kUseDIV | kUseGSQ | kUseCLIP | kUseG32>(
      dtype, sr, div, gsq, false, clip,
      [&](auto k) { fn = lomo_chunk_pick<decltype(k), LomoTensor>(); }, grad_dtype);
  return fn;
}

using LomoScratch = TensorScratch<LomoTensor, double>;  // parts: gradient-norm partials

int64_t lomo_scratch_numel(int64_t k, int64_t units, bool multi) {
  Carver cv;
  carve_tensors<LomoTensor, double>(cv, k, units, multi);
  return scratch_numel(kHeader, cv.bytes());
}

void run_lomo(const LomoTensor* t, const int64_t* first, int64_t k) {
  parallel_tensor_units(t, first, k, [](const LomoTensor& x, int64_t u) { x.fn(x, u); });
}

}  // namespace

int64_t lomo_workspace_numel_cpu(const std::vector<std::vector<int64_t>>& shapes, bool multi) {
  int64_t most = 0, all = 0;
  for (const auto& s : shapes) {
    most = std::max(most, ceil_div(numel_of(s), kChunk));
    all += ceil_div(numel_of(s), kChunk);
  }
  return multi ? lomo_scratch_numel(static_cast<int64_t>(shapes.size()), all, true)
               : lomo_scratch_numel(1, most, false);
}

}  // namespace cpu

namespace {

// The tensor-independent part of a call: flags and the shared outputs.
struct LomoCommon {
  Preprocess pre;
  bool sr;
  bool clip;  // value clipping or clip_coef is on
  float coef;
  float* grad_sq;
};

cpu::LomoTensor make_tensor(const LomoCommon& c, const at::Tensor& param, const at::Tensor& grad,
                            double lr, double weight_decay, int64_t seed, int64_t step,
                            double* gsq, std::atomic<int>* found) {
  cpu::LomoTensor t{};
  t.s = make_lomo_scalars(c.pre, lr, weight_decay, seed, step);
  t.coef = c.coef;
  t.p = param.data_ptr();
  t.g = grad.data_ptr();
  t.n = param.numel();
  t.gsq = gsq;
  t.found = found;
  t.fn = cpu::pick_lomo(param.scalar_type(), grad.scalar_type(), c.sr, c.pre.divide,
                        c.grad_sq != nullptr, c.clip);
  t.fast = std::isfinite(t.s.neg_lr) && std::fabs(t.s.decay) <= 1.0f &&
           std::fabs(c.coef) <= 1.0f &&
           (c.pre.divide ? std::fabs(c.pre.scale) >= 1.0f : std::fabs(c.pre.scale) <= 1.0f);
  return t;
}

// grad_sq += each tensor's sum, in list order (one float addition per tensor, as the
// single-tensor op does).
void add_grad_sq(float* grad_sq, const double* gsq, const int64_t* first, int64_t k) {
  if (!grad_sq) return;
  for (int64_t i = 0; i < k; ++i) {
    if (first[i] == first[i + 1]) continue;
    double s = 0.0;
    for (int64_t u = first[i]; u < first[i + 1]; ++u) s += gsq[u];
    grad_sq[0] += static_cast<float>(s);
  }
}

}  // namespace

void lomo_update_cpu(LOMO_UPDATE_PARAMS) {
  using namespace cpu;
  constexpr const char* op = "lomo_update_";
  check_common(op, param, grad, clip_coef, found_inf);
  CHECK_CPU(op, param);
  check_scalar_out(op, "grad_sq", grad_sq, param);
  const bool sr = parse_rounding(op, rounding);
  const int64_t n = param.numel();
  if (n == 0) return;

  LomoCommon common{make_preprocess(loss_scale, clip_grad_value), sr,
                    clip_grad_value > 0 || clip_coef.has_value(),
                    clip_coef.has_value() ? clip_coef->data_ptr<float>()[0] : 1.0f,
                    grad_sq.has_value() ? grad_sq->data_ptr<float>() : nullptr};
  const int64_t units = ceil_div(n, kChunk);
  double* gsq = nullptr;
  std::optional<Scratch> scratch;
  if (common.grad_sq) {  // the only scratch a single LOMO update needs
    scratch.emplace(op, workspace, lomo_scratch_numel(1, units, false));
    Carver cv = scratch->carver(kHeader);
    gsq = carve_tensors<LomoTensor, double>(cv, 1, units, false).parts;
  }
  std::atomic<int> found{0};
  const LomoTensor t = make_tensor(common, param, grad, lr, weight_decay, seed, step, gsq, &found);
  const int64_t first[2] = {0, units};
  run_lomo(&t, first, 1);
  add_grad_sq(common.grad_sq, gsq, first, 1);
  if (found.load() && found_inf.has_value()) found_inf->data_ptr<float>()[0] = 1.0f;
}

void lomo_update_multi_cpu(LOMO_UPDATE_MULTI_PARAMS) {
  using namespace cpu;
  constexpr const char* op = "lomo_update_multi_";
  const int64_t k = static_cast<int64_t>(params.size());
  check_multi_lists(op, params, grads, {&lr, &weight_decay, &clip_grad_value}, {&seed, &step});
  int64_t units = 0;
  for (int64_t i = 0; i < k; ++i) {
    check_common(op, params[i], grads[i], clip_coef, found_inf);
    CHECK_CPU(op, params[i]);
    check_scalar_out(op, "grad_sq", grad_sq, params[i]);
    units += ceil_div(params[i].numel(), kChunk);
  }
  const bool sr = parse_rounding(op, rounding);
  if (k == 0) return;
  Scratch scratch(op, workspace, lomo_scratch_numel(k, units, true));
  Carver cv = scratch.carver(kHeader);
  const LomoScratch s = carve_tensors<LomoTensor, double>(cv, k, units, true);
  const float coef = clip_coef.has_value() ? clip_coef->data_ptr<float>()[0] : 1.0f;
  float* gs = grad_sq.has_value() ? grad_sq->data_ptr<float>() : nullptr;
  std::atomic<int> found{0};
  units = 0;
  for (int64_t i = 0; i < k; ++i) {
    const LomoCommon common{make_preprocess(loss_scale, clip_grad_value[i]), sr,
                            clip_grad_value[i] > 0 || clip_coef.has_value(), coef, gs};
    s.tensors[i] = make_tensor(common, params[i], grads[i], lr[i], weight_decay[i], seed[i],
                               step[i], s.parts + units, &found);
    s.first[i] = units;
    units += ceil_div(params[i].numel(), kChunk);
  }
  s.first[k] = units;
  run_lomo(s.tensors, s.first, k);
  add_grad_sq(gs, s.parts, s.first, k);
  if (found.load() && found_inf.has_value()) found_inf->data_ptr<float>()[0] = 1.0f;
}

}  // namespace lomo
