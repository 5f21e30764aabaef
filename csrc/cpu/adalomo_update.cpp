// AdaLomo on the CPU (SPEC.md): three passes over g, one write of p, fp32 math.
//
//   pass 1: non-finite flag, sum(p*p), and G = g*g + eps1 summed along rows and columns
//           (factored) -- then, on the host, the new state and the row/column factors;
//   pass 2: sum(u*u) with the new state;
//   pass 3: u / max(1, rms(u) / clip_threshold), apply, round, store p.
// A non-finite gradient element leaves p and the state untouched (decided after pass 1).
//
// Factored parameters (dim >= 2) are split into tiles of at most kTileElems elements, up to
// kTileCols columns wide (whole rows up to 4096 columns: long contiguous runs for the prefetcher)
// inside one [m, n] slice; a tile writes its row sums, column sums and scalar partials to its own
// slots, which are then added in a fixed order: the result does not depend on the thread count.
//
// Speed: passes 1 and 2 are split in two loops over kSub elements of a tile row (or of a flat
// chunk): a plain contiguous loop that the compiler vectorises (upcast, preprocessing, G or u in
// fp32, then widened to double: G, p*p and u*u, the squares exact in double) into a small double
// buffer, then the double accumulation of that buffer with 8-lane vector-extension registers
// (row sums: kLanes accumulators, lane k = element j % 8; sums of squares: kSqAcc x kLanes
// accumulators, see lanes_add_d). Every order is fixed by the shape alone.
#include <cmath>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace cpu {
namespace {

constexpr int64_t kTileCols = 4096;
constexpr int64_t kTileElems = 262144;
constexpr int kLanes = 8;  // independent accumulators: vectorisable and order-fixed

struct AdaCtx {
  AdaLomoScalars s;
  float coef;  // clip_coef, 1 when off
  void* p;
  const void* g;
  int64_t numel;
  // factored geometry: `slices` matrices of m x n, tiles of tr x tc
  int64_t slices, m, n, tr, tc, nrb, ncb;
  double* rowpart;  // [ncb][slices * m] row sums of G per column block
  double* colpart;  // [slices * nrb][n] column sums of G per row block
  double* part;     // [units] sum(p*p) in pass 1, sum(u*u) in pass 2
  uint8_t* bad;     // [units] a non-finite gradient element was seen
  const float* rfac;  // [slices * m] rsqrt(r / mean(r))
  const float* cfac;  // [slices * n] rsqrt(c)
  float* v;           // unfactored state
  float denom, lr_t, decay;
};

struct Tile {
  int64_t s, srb, cb, r0, r1, c0, w;
};

LOMO_CPU_INLINE Tile tile_of(const AdaCtx& c, int64_t unit) {
  Tile t;
  t.cb = unit % c.ncb;
  t.srb = unit / c.ncb;
  t.s = t.srb / c.nrb;
  t.r0 = (t.srb % c.nrb) * c.tr;
  t.r1 = std::min(c.m, t.r0 + c.tr);
  t.c0 = t.cb * c.tc;
  t.w = std::min(c.n, t.c0 + c.tc) - t.c0;
  return t;
}

// kLanes doubles: one zmm with AVX-512, two ymm with AVX2, four xmm on the baseline.
typedef double V8d __attribute__((vector_size(64)));
static_assert(kLanes == 8, "V8d holds kLanes lanes");
// Columns per unit of the host's column-sum reduction.
constexpr int64_t kColRun = 4096;

LOMO_CPU_INLINE double lane_sum(const V8d& l) {
  double s = 0.0;
  for (int k = 0; k < kLanes; ++k) s += l[k];
  return s;
}

// The sums of squares (sum(p*p), sum(u*u)) are one long chain per tile or chunk: kSqAcc
// vectors of kLanes accumulators hide the latency of the double additions. Element j of a run
// goes to acc[(j / 8) % kSqAcc][j % 8] (the last j % 8 of a run to acc[0]), added in increasing j.
constexpr int kSqAcc = 4;
struct SqAcc {
  V8d a[kSqAcc];
};

// Elements per double staging buffer of passes 1 and 2 (a multiple of kSqAcc * kLanes, so that
// staging a run in blocks does not move any element to another accumulator).
constexpr int64_t kSub = 1024;
static_assert(kSub % (kSqAcc * kLanes) == 0, "kSub");

LOMO_CPU_INLINE double sq_sum(const SqAcc& acc) {
  double s = 0.0;
  for (int i = 0; i < kSqAcc; ++i)
    for (int k = 0; k < kLanes; ++k) s += acc.a[i][k];
  return s;
}

// acc += x[j] for j in [0, len), in increasing j.
LOMO_CPU_INLINE void lanes_add_d(SqAcc& acc, const double* __restrict x, int64_t len) {
  int64_t j = 0;
  for (; j + kSqAcc * kLanes <= len; j += kSqAcc * kLanes) {
    for (int i = 0; i < kSqAcc; ++i) {
      V8d v;
      std::memcpy(&v, x + j + i * kLanes, sizeof v);
      acc.a[i] += v;
    }
  }
  for (int i = 0; j + kLanes <= len; j += kLanes, ++i) {
    V8d v;
    std::memcpy(&v, x + j, sizeof v);
    acc.a[i] += v;
  }
  for (int k = 0; j < len; ++j, ++k) acc.a[0][k] += x[j];
}

// ---- factored pass 1: row/column sums of G, sum(p*p), non-finite flag --------------------------
template <Fmt F, bool SR, bool DIV>
LOMO_CPU_INLINE void factored_stats(const AdaCtx& c, int64_t unit) {
  using S = storage_t<F>;
  const Tile t = tile_of(c, unit);
  const float scale = c.s.scale, clip = c.s.clip, coef = c.coef, eps1 = c.s.eps1;
  const int64_t w = t.w, n = c.n;
  double* __restrict col = c.colpart + t.srb * n + t.c0;
  double* __restrict rowpart = c.rowpart + t.cb * c.slices * c.m;
  // double staging (the upcast happens in the vectorised loop), kSub columns at a time
  alignas(64) double gd[kSub];
  alignas(64) double pd[kSub];
  for (int64_t j = 0; j < w; ++j) col[j] = 0.0;
  SqAcc pl = {};
  uint32_t bad = 0;
  for (int64_t r = t.r0; r < t.r1; ++r) {
    const int64_t row = t.s * c.m + r;
    const S* __restrict g = static_cast<const S*>(c.g) + row * n + t.c0;
    const S* __restrict p = static_cast<const S*>(c.p) + row * n + t.c0;
    V8d rl = {};
    for (int64_t b = 0; b < w; b += kSub) {  // kSub is a multiple of kSqAcc * kLanes
      const int64_t bl = std::min(kSub, w - b);
      for (int64_t j = 0; j < bl; ++j) {  // fp32 math, vectorised
        const float graw = to_f32<F>(g[b + j]);
        bad |= is_finite_f32(graw) ? 0u : 1u;
        const float gv = preprocess<DIV>(graw, scale, clip, coef);
        gd[j] = gv * gv + eps1;
        const double pv = to_f32<F>(p[b + j]);
        pd[j] = pv * pv;
      }
      double* __restrict cb = col + b;
      int64_t j = 0;
      for (; j + kLanes <= bl; j += kLanes) {
        V8d G, cv;
        std::memcpy(&G, gd + j, sizeof G);
        rl += G;
        std::memcpy(&cv, cb + j, sizeof cv);
        cv += G;
        std::memcpy(cb + j, &cv, sizeof cv);
      }
      for (int k = 0; j < bl; ++j, ++k) {
        rl[k] += gd[j];
        cb[j] += gd[j];
      }
      lanes_add_d(pl, pd, bl);
    }
    rowpart[row] = lane_sum(rl);
  }
  c.part[unit] = sq_sum(pl);
  c.bad[unit] = bad ? 1 : 0;
}
LOMO_CPU_CLONES(factored_stats)

// ---- factored pass 2: sum(u*u), u = (rfac * cfac) * g -----------------------------------------
template <Fmt F, bool SR, bool DIV>
LOMO_CPU_INLINE void factored_unorm(const AdaCtx& c, int64_t unit) {
  using S = storage_t<F>;
  const Tile t = tile_of(c, unit);
  const float scale = c.s.scale, clip = c.s.clip, coef = c.coef;
  const int64_t w = t.w;
  const float* __restrict cf = c.cfac + t.s * c.n + t.c0;
  alignas(64) double ud[kSub];
  SqAcc ul = {};
  for (int64_t r = t.r0; r < t.r1; ++r) {
    const int64_t row = t.s * c.m + r;
    const float rf = c.rfac[row];
    const S* __restrict g = static_cast<const S*>(c.g) + row * c.n + t.c0;
    for (int64_t b = 0; b < w; b += kSub) {
      const int64_t bl = std::min(kSub, w - b);
      for (int64_t j = 0; j < bl; ++j) {
        const float gv = preprocess<DIV>(to_f32<F>(g[b + j]), scale, clip, coef);
        const double u = (rf * cf[b + j]) * gv;
        ud[j] = u * u;
      }
      lanes_add_d(ul, ud, bl);
    }
  }
  c.part[unit] = sq_sum(ul);
}
LOMO_CPU_CLONES(factored_unorm)

// One element of pass 3: p = p * decay - lr_t * (u / denom), rounded to the stored dtype.
// The step scalars are passed by value: read through `c` they could alias the stores to p.
template <Fmt F, bool SR>
LOMO_CPU_INLINE storage_t<F> apply_one(float denom, float decay, float lr_t, storage_t<F> p,
                                       float u, uint32_t bits) {
  const float un = u / denom;
  const float nv = to_f32<F>(p) * decay - lr_t * un;
  return from_f32<F, SR>(nv, bits);
}

// ---- factored pass 3: apply ------------------------------------------------------------------
template <Fmt F, bool SR, bool DIV>
LOMO_CPU_INLINE void factored_apply(const AdaCtx& c, int64_t unit) {
  using S = storage_t<F>;
  const Tile t = tile_of(c, unit);
  const float scale = c.s.scale, clip = c.s.clip, coef = c.coef;
  const float denom = c.denom, decay = c.decay, lr_t = c.lr_t;
  const uint32_t key = c.s.key;
  const float* __restrict cf = c.cfac + t.s * c.n + t.c0;
  for (int64_t r = t.r0; r < t.r1; ++r) {
    const int64_t row = t.s * c.m + r;
    const float rf = c.rfac[row];
    int64_t begin = row * c.n + t.c0;
    const int64_t end = begin + t.w;
    const float* __restrict cfj = cf;
    while (begin < end) {  // split where the hash's high half changes
      const int64_t stop = std::min(end, ((begin >> 32) + 1) << 32);
      const uint32_t hk = hash_high_key(key, static_cast<uint64_t>(begin));
      const uint32_t lo = static_cast<uint32_t>(begin);
      S* __restrict p = static_cast<S*>(c.p) + begin;
      const S* __restrict g = static_cast<const S*>(c.g) + begin;
      const int64_t len = stop - begin;
      for (int64_t j = 0; j < len; ++j) {
        const float gv = preprocess<DIV>(to_f32<F>(g[j]), scale, clip, coef);
        const float u = (rf * cfj[j]) * gv;
        const uint32_t bits = SR ? mix32((lo + static_cast<uint32_t>(j)) ^ hk) : 0u;
        p[j] = apply_one<F, SR>(denom, decay, lr_t, p[j], u, bits);
      }
      cfj += len;
      begin = stop;
    }
  }
}
LOMO_CPU_CLONES(factored_apply)

// ---- unfactored (0-d / 1-d): chunks of kChunk elements -----------------------------------------
template <Fmt F, bool SR, bool DIV>
LOMO_CPU_INLINE void flat_stats(const AdaCtx& c, int64_t unit) {
  using S = storage_t<F>;
  const int64_t begin = unit * kChunk, len = std::min(c.numel - begin, kChunk);
  const S* __restrict g = static_cast<const S*>(c.g) + begin;
  const S* __restrict p = static_cast<const S*>(c.p) + begin;
  alignas(64) double pd[kSub];
  SqAcc pl = {};
  uint32_t bad = 0;
  for (int64_t b = 0; b < len; b += kSub) {
    const int64_t bl = std::min(kSub, len - b);
    for (int64_t j = 0; j < bl; ++j) {
      bad |= is_finite_f32(to_f32<F>(g[b + j])) ? 0u : 1u;
      const double pv = to_f32<F>(p[b + j]);
      pd[j] = pv * pv;
    }
    lanes_add_d(pl, pd, bl);
  }
  c.part[unit] = sq_sum(pl);
  c.bad[unit] = bad ? 1 : 0;
}
LOMO_CPU_CLONES(flat_stats)

// v = beta * v + (1 - beta) * G (torch.add(v * b, G, alpha=1-b): one fma), u = rsqrt(v) * g.
template <Fmt F, bool DIV>
LOMO_CPU_INLINE float flat_u_update_v(const AdaLomoScalars& s, float coef, float* v,
                                      storage_t<F> graw) {
  const float gv = preprocess<DIV>(to_f32<F>(graw), s.scale, s.clip, coef);
  const float G = gv * gv + s.eps1;
  const float vn = __builtin_fmaf(G, s.one_minus_beta, *v * s.beta);
  *v = vn;
  return (1.0f / std::sqrt(vn)) * gv;
}

template <Fmt F, bool SR, bool DIV>
LOMO_CPU_INLINE void flat_unorm(const AdaCtx& c, int64_t unit) {
  using S = storage_t<F>;
  const int64_t begin = unit * kChunk, len = std::min(c.numel - begin, kChunk);
  const S* __restrict g = static_cast<const S*>(c.g) + begin;
  float* __restrict v = c.v + begin;
  const AdaLomoScalars s = c.s;  // a local copy: the stores to v cannot alias it
  const float coef = c.coef;
  alignas(64) double ud[kSub];
  SqAcc ul = {};
  for (int64_t b = 0; b < len; b += kSub) {
    const int64_t bl = std::min(kSub, len - b);
    for (int64_t j = 0; j < bl; ++j) {
      const double u = flat_u_update_v<F, DIV>(s, coef, v + b + j, g[b + j]);
      ud[j] = u * u;
    }
    lanes_add_d(ul, ud, bl);
  }
  c.part[unit] = sq_sum(ul);
}
LOMO_CPU_CLONES(flat_unorm)

template <Fmt F, bool SR, bool DIV>
LOMO_CPU_INLINE void flat_apply(const AdaCtx& c, int64_t unit) {
  using S = storage_t<F>;
  const int64_t begin = unit * kChunk, len = std::min(c.numel - begin, kChunk);
  // kChunk divides 2**32: a chunk never crosses a change of the hash's high half.
  const uint32_t hk = hash_high_key(c.s.key, static_cast<uint64_t>(begin));
  const uint32_t lo = static_cast<uint32_t>(begin);
  const S* __restrict g = static_cast<const S*>(c.g) + begin;
  S* __restrict p = static_cast<S*>(c.p) + begin;
  const float* __restrict v = c.v + begin;
  const float scale = c.s.scale, clip = c.s.clip, coef = c.coef;
  const float denom = c.denom, decay = c.decay, lr_t = c.lr_t;
  for (int64_t j = 0; j < len; ++j) {
    const float gv = preprocess<DIV>(to_f32<F>(g[j]), scale, clip, coef);
    const float u = (1.0f / std::sqrt(v[j])) * gv;
    const uint32_t bits = SR ? mix32((lo + static_cast<uint32_t>(j)) ^ hk) : 0u;
    p[j] = apply_one<F, SR>(denom, decay, lr_t, p[j], u, bits);
  }
}
LOMO_CPU_CLONES(flat_apply)

template <class Pick>
void run(int64_t units, const AdaCtx& c, Pick pick) {
  auto fn = pick();
  parallel_units(units, [&](int64_t u) { fn(c, u); });
}

double sum_in_order(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return s;
}

float rms_of(double sum_sq, int64_t numel) {
  return static_cast<float>(std::sqrt(sum_sq) / std::sqrt(static_cast<double>(numel)));
}

bool any_set(const std::vector<uint8_t>& bad) {
  for (uint8_t b : bad)
    if (b) return true;
  return false;
}

}  // namespace
}  // namespace cpu

void adalomo_update_cpu(ADALOMO_UPDATE_PARAMS) {
  using namespace cpu;
  constexpr const char* op = "adalomo_update_";
  check_common(op, param, grad, clip_coef, found_inf);
  check_not_implemented(op, grad_sq, stage);
  CHECK_CPU(op, param);
  check_adalomo_state(param, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq);
  const bool sr = parse_rounding(op, rounding);
  const int64_t numel = param.numel();
  if (numel == 0) return;

  const Preprocess pre = make_preprocess(loss_scale, clip_grad_value);
  AdaCtx c{};
  c.s = make_adalomo_scalars(pre, lr, weight_decay, beta, eps1, eps2, clip_threshold, seed, step);
  c.coef = clip_coef.has_value() ? clip_coef->data_ptr<float>()[0] : 1.0f;
  c.p = param.data_ptr();
  c.g = grad.data_ptr();
  c.numel = numel;
  const bool factored = param.dim() >= 2;
  int64_t units = ceil_div(numel, kChunk);
  std::vector<double> rowpart, colpart;
  std::vector<float> rfac, cfac;
  if (factored) {
    c.n = param.size(-1);
    c.m = param.size(-2);
    c.slices = numel / (c.m * c.n);
    c.tc = std::min(c.n, kTileCols);
    c.tr = std::min(c.m, std::max<int64_t>(1, kTileElems / c.tc));
    c.nrb = ceil_div(c.m, c.tr);
    c.ncb = ceil_div(c.n, c.tc);
    units = c.slices * c.nrb * c.ncb;
    rowpart.resize(c.ncb * c.slices * c.m);
    colpart.resize(c.slices * c.nrb * c.n);
    c.rowpart = rowpart.data();
    c.colpart = colpart.data();
  } else {
    c.v = exp_avg_sq->data_ptr<float>();
  }
  std::vector<double> part(units);
  std::vector<uint8_t> bad(units);
  c.part = part.data();
  c.bad = bad.data();

  cpu::dispatch_flags(param.scalar_type(), sr, pre.divide, [&](auto f, auto sr_t, auto div_t) {
    constexpr Fmt F = decltype(f)::value;
    constexpr bool SR = decltype(sr_t)::value, DIV = decltype(div_t)::value;
    // pass 1
    if (factored)
      run(units, c, factored_stats_pick<F, false, DIV, AdaCtx>);
    else
      run(units, c, flat_stats_pick<F, false, DIV, AdaCtx>);
    if (any_set(bad)) {  // leave p and the state unchanged
      if (found_inf.has_value()) found_inf->data_ptr<float>()[0] = 1.0f;
      return;
    }
    const float rms_p = rms_of(sum_in_order(part), numel);
    // state update and factors (factored), pass 2
    if (factored) {
      const int64_t rows = c.slices * c.m;
      float* r = exp_avg_sq_row->data_ptr<float>();
      float* cs = exp_avg_sq_col->data_ptr<float>();
      rfac.resize(rows);
      cfac.resize(c.slices * c.n);
      const float b = c.s.beta, omb = c.s.one_minus_beta;
      // r = b * r + (1 - b) * mean(G, -1): torch.add(r * b, mean, alpha=1-b), one fma
      parallel_units(ceil_div(rows, kChunk), [&](int64_t u) {
        for (int64_t i = u * kChunk; i < std::min(rows, (u + 1) * kChunk); ++i) {
          double sum = 0.0;
          for (int64_t cb = 0; cb < c.ncb; ++cb) sum += rowpart[cb * rows + i];
          r[i] = std::fma(static_cast<float>(sum / c.n), omb, r[i] * b);
        }
      });
      // column sums: the row blocks added in order, a contiguous run of columns at a time
      const int64_t ncol_units = ceil_div(c.n, kColRun);
      parallel_units(c.slices * ncol_units, [&](int64_t u) {
        const int64_t s = u / ncol_units, j0 = (u % ncol_units) * kColRun;
        const int64_t len = std::min(c.n - j0, kColRun);
        double sum[kColRun];
        for (int64_t j = 0; j < len; ++j) sum[j] = 0.0;
        for (int64_t rb = 0; rb < c.nrb; ++rb) {
          const double* __restrict cp = colpart.data() + (s * c.nrb + rb) * c.n + j0;
          for (int64_t j = 0; j < len; ++j) sum[j] += cp[j];
        }
        for (int64_t j = 0; j < len; ++j) {
          const int64_t i = s * c.n + j0 + j;
          cs[i] = std::fma(static_cast<float>(sum[j] / c.m), omb, cs[i] * b);
          cfac[i] = 1.0f / std::sqrt(cs[i]);
        }
      });
      // rfac = rsqrt(r / mean(r)), mean over each slice's m rows
      parallel_units(c.slices, [&](int64_t s) {
        double sum = 0.0;
        for (int64_t i = 0; i < c.m; ++i) sum += r[s * c.m + i];
        const float mean = static_cast<float>(sum / c.m);
        for (int64_t i = 0; i < c.m; ++i) rfac[s * c.m + i] = 1.0f / std::sqrt(r[s * c.m + i] / mean);
      });
      c.rfac = rfac.data();
      c.cfac = cfac.data();
      run(units, c, factored_unorm_pick<F, false, DIV, AdaCtx>);
    } else {
      run(units, c, flat_unorm_pick<F, false, DIV, AdaCtx>);
    }
    // pass 3
    c.denom = adalomo_denom(c.s, rms_of(sum_in_order(part), numel));
    c.lr_t = adalomo_lr_t(c.s, rms_p);
    c.decay = adalomo_decay(c.s, c.lr_t);
    if (factored)
      run(units, c, factored_apply_pick<F, SR, DIV, AdaCtx>);
    else
      run(units, c, flat_apply_pick<F, SR, DIV, AdaCtx>);
  });
}

}  // namespace lomo
