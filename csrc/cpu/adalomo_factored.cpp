// AdaLomo on the CPU for factored parameters (dim >= 2: S slices of m x n; docs/spec.md). Three
// passes, each a stage of the op contract (stage 0 runs them in one call; 1, 2, 3 one each, for a
// parameter sharded on dim 0):
//   stage 1: non-finite flag, sum(p*p), row sums of G = g*g + eps1 (-> the new r, kept in the
//            scratch, and sum(r) per slice) and column sums of G, into the workspace header (a
//            pass over the tiles, then a short phase over slices and runs of columns);
//   stage 2: new c from the (all-reduced) column sums, sum(u*u) with the new r and c;
//   stage 3: u / max(1, rms(u) / clip_threshold), apply, round, store p; commit r and c.
// A non-finite gradient element leaves p and the state untouched (decided after stage 1).
//
// Work units are tiles of up to kTileCols columns and a row group (at most kMaxRowGroups per
// slice), fixed by the shape alone. Each tile writes its partial sums to its own slot and its
// column sums to its own row of partials; they are added in index order, so the results do not
// depend on the number of threads. The sums are 16-lane fp32 blocks added into double
// (cpu_vec.h); column sums are fp32 over at most kFlushRows rows, then double.
#include <cmath>
#include <cstring>

#include "cpu/adalomo_cpu.h"
#include "cpu/bf16_pairs.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_vec.h"
#include "cpu/cpu_workspace.h"
#include "cpu/factored_tiles.h"

namespace lomo {
namespace cpu {
namespace {

constexpr int64_t kFlushRows = 64;
constexpr int64_t kColRun = 512;  // columns per unit of the column-sum reduction

// ================================ factored parameters ========================================
int64_t header_floats(const Geo& g) { return kHeader + g.S + g.S * g.n; }

struct FacScratch {
  float* newr;       // [S*m] the new r (stage 1 -> 3)
  float* cnew;       // [S*n] the new c (stage 2 -> 3)
  float* cfac;       // [S*n] rsqrt(new c)
  double* rowpart;   // [ncb][S*m] row sums of G per column block
  double* colpart;   // [S*nrb][n] column sums of G per row group
  Slot* slots;       // [units]
};

FacScratch carve_factored(Carver& cv, const Geo& g) {
  FacScratch s;
  s.newr = cv.take<float>(g.S * g.m);
  s.cnew = cv.take<float>(g.S * g.n);
  s.cfac = cv.take<float>(g.S * g.n);
  s.rowpart = cv.take<double>(g.ncb * g.S * g.m);
  s.colpart = cv.take<double>(g.S * g.nrb * g.n);
  s.slots = cv.take<Slot>(g.units);
  return s;
}

int64_t factored_numel(const Geo& g) {
  Carver cv;
  carve_factored(cv, g);
  return scratch_numel(header_floats(g), cv.bytes());
}

struct FacCtx {
  AdaLomoScalars s;
  float coef;
  void* p;
  const void* g;
  Geo geo;
  FacScratch w;
  float* hdr;         // the workspace header
  float* r;           // state [S*m]
  float* c;           // state [S*n]
  int64_t rows_g;     // unsharded rows (the divisor of the means over rows)
  bool fused_c;       // stage 0: the finalize phase also makes the new c
  AdaStep st;         // stage 3
};

// mean(new r) of slice s, from the (reduced) header
LOMO_CPU_INLINE float mean_r(const FacCtx& c, int64_t s) {
  return static_cast<float>(static_cast<double>(c.hdr[kHeader + s]) /
                            static_cast<double>(c.rows_g));
}

// ---- stage 1 pass: row/column sums of G, sum(p*p), sum((g/ls)**2), non-finite flag ----------
template <class K, int W>
LOMO_CPU_INLINE void fac_stats(const FacCtx& c, int64_t unit) {
  constexpr Fmt F = K::F;
  using S = storage_t<F>;
  using VF = typename Vec<W>::F;
  using VU = typename Vec<W>::U;
  using Gr = GroupOf<F, K::GF, W>;
  using SG = storage_t<K::GF>;  // the gradient: S, or float32 (an accumulation buffer)
  constexpr int P = Lanes<W>::P;
  const Geo& geo = c.geo;
  const Tile t = tile_of(geo, unit);
  const VPre<K::DIV, W, K::CLIP> pre(c.s.scale, c.s.clip, c.coef);
  const VF eps1 = splat<W>(c.s.eps1);
  const int64_t w = t.w, n = geo.n;
  double* __restrict colpart = c.w.colpart + (t.s * geo.nrb + t.rg) * n + t.c0;
  double* __restrict rowpart = c.w.rowpart + t.cb * geo.S * geo.m;
  // fp32 column sums of up to kFlushRows rows; each group of 16 columns in the lane order of
  // Gr (bf16_pairs.h), put back in column order when flushed to colpart
  alignas(64) float colf[kTileCols + kLanes];
  DAcc<W> pp, gq;
  // NaN/Inf in g. Without value clipping or clip_coef, a NaN/Inf gradient makes its G and so its
  // row's sum non-finite (a float sum never turns finite again), so a finite row sum clears the
  // row and only a non-finite one (a bad element, or an overflow of finite ones) is decided from
  // the stored words. Clipping maps Inf to a finite value: then the largest exponent field seen
  // (0xFF marks NaN/Inf) is tracked per element.
  VU emax[P] = {};
  uint32_t bad = 0;
  for (int64_t rb = t.r0; rb < t.r1; rb += kFlushRows) {
    const int64_t re = std::min(t.r1, rb + kFlushRows);
    std::memset(colf, 0, sizeof(float) * static_cast<size_t>(ceil_div(w, kLanes) * kLanes));
    for (int64_t r = rb; r < re; ++r) {
      const int64_t row = t.s * geo.m + r;
      const SG* __restrict g = static_cast<const SG*>(c.g) + row * n + t.c0;
      const S* __restrict p = static_cast<const S*>(c.p) + row * n + t.c0;
      DAcc<W> racc;
      for (int64_t b = 0; b < w; b += kBlock) {
        const int64_t be = std::min(w, b + kBlock);
        Lanes<W> fr, fp, fq;  // in Gr's lane order until the block is added
        // 16 elements from gs / ps (column j of the tile); `rest` < 16: a zero-padded tail
        const auto group = [&](const SG* gs, const S* ps, int64_t j, int rest)
                               __attribute__((always_inline)) {
          VF gr[P], pr[P];
          group_of_load<F, K::GF, W>(gs, gr);
          Gr::load(ps, pr);
          for (int q = 0; q < P; ++q) {
            const VF graw = gr[q];
            if constexpr (K::CLIP) {
              const VU e = (VU)graw & 0x7F800000u;
              emax[q] = emax[q] > e ? emax[q] : e;
            }
            if constexpr (K::GSQ) {
              const VF gu = pre.unscale(graw);
              fq.v[q] += gu * gu;
            }
            const VF gv = pre(graw);
            VF G = gv * gv + eps1;
            if (rest) G = Gr::ids(q) < rest ? G : VF{};
            fr.v[q] += G;
            VF cs;
            std::memcpy(&cs, colf + j + q * W, sizeof cs);
            cs += G;
            std::memcpy(colf + j + q * W, &cs, sizeof cs);
            fp.v[q] += pr[q] * pr[q];
          }
        };
        int64_t j = b;
        for (; j + kLanes <= be; j += kLanes) {
          if ((j & (kPrefetchRun - 1)) == 0) {  // cpu_vec.h
            prefetch_run_ahead<0>(g + j);
            prefetch_run_ahead<0>(p + j);
          }
          group(g + j, p + j, j, 0);
        }
        if (j < be) {
          const int rest = static_cast<int>(be - j);
          group(Padded<K::GF>(g + j, rest).v, Padded<F>(p + j, rest).v, j, rest);
        }
        racc.add(Gr::logical(fr));
        pp.add(Gr::logical(fp));
        if constexpr (K::GSQ) gq.add(Gr::logical(fq));
      }
      const double rs = racc.sum();
      rowpart[row] = rs;
      if constexpr (!K::CLIP)
        if (!std::isfinite(rs)) bad |= any_non_finite<K::GF>(g, g, w) ? 1u : 0u;
    }
    for (int64_t j0 = 0; j0 < w; j0 += kLanes) {  // column order again
      for (int q = 0; q < P; ++q) {
        for (int k = 0; k < W; ++k) {
          const int64_t j = j0 + Gr::element(q, k);
          if (j >= w) continue;
          const float x = colf[j0 + q * W + k];
          colpart[j] = rb == t.r0 ? static_cast<double>(x) : colpart[j] + x;
        }
      }
    }
  }
  if constexpr (K::CLIP)
    for (int q = 0; q < P; ++q)
      for (int k = 0; k < W; ++k) bad |= emax[q][k] == 0x7F800000u ? 1u : 0u;
  c.w.slots[unit] = Slot{pp.sum(), K::GSQ ? gq.sum() : 0.0, 0.0, bad};
}
LOMO_CPU_CLONES(fac_stats)

// The tile's w <= kTileCols column factors c_j copied to out in the lane order of the group G
// (bf16_pairs.h's word pairs: even columns of each 16, then odd), so that the passes load c_j
// next to g and p without shuffles; a last partial 16 zero-padded (out: kTileCols floats).
template <class G, int W>
LOMO_CPU_INLINE void cols_in_lane_order(float* __restrict out, const float* __restrict cf,
                                        int64_t w) {
  static_assert(kTileCols % kLanes == 0, "the padded tail must fit in kTileCols");
  for (int64_t j = 0; j < w; j += kLanes) {
    const int64_t rest = std::min<int64_t>(kLanes, w - j);
    float cbuf[kLanes] = {};
    std::memcpy(cbuf, cf + j, static_cast<size_t>(rest) * sizeof(float));
    typename Vec<W>::F v[kLanes / W];
    G::load_f32(cbuf, v);
    std::memcpy(out + j, v, sizeof v);
  }
}

// ---- stage 2 pass: sum(u*u), u = (rfac * cfac) * g ------------------------------------------
template <class K, int W>
LOMO_CPU_INLINE void fac_unorm(const FacCtx& c, int64_t unit) {
  using SG = storage_t<K::GF>;
  using VF = typename Vec<W>::F;
  using Gr = GroupOf<K::F, K::GF, W>;
  constexpr int P = Lanes<W>::P;
  const Geo& geo = c.geo;
  const Tile t = tile_of(geo, unit);
  const VPre<K::DIV, W, K::CLIP> pre(c.s.scale, c.s.clip, c.coef);
  const float mean = mean_r(c, t.s);
  const float* __restrict cf = c.w.cfac + t.s * geo.n + t.c0;
  alignas(64) float cg[kTileCols];  // this tile's c_j in Gr's lane order, its tail padded
  cols_in_lane_order<Gr, W>(cg, cf, t.w);
  DAcc<W> uu;
  for (int64_t r = t.r0; r < t.r1; ++r) {
    const int64_t row = t.s * geo.m + r;
    const float rf = 1.0f / std::sqrt(c.w.newr[row] / mean);
    const SG* __restrict g = static_cast<const SG*>(c.g) + row * geo.n + t.c0;
    for (int64_t b = 0; b < t.w; b += kBlock) {
      const int64_t be = std::min(t.w, b + kBlock);
      Lanes<W> fu;  // in Gr's lane order until the block is added
      const auto group = [&](const SG* gs, int64_t j, int rest) __attribute__((always_inline)) {
        VF gv[P], cv[P];
        group_of_load<K::F, K::GF, W>(gs, gv);
        std::memcpy(cv, cg + j, sizeof cv);
        for (int q = 0; q < P; ++q) {
          VF u = (rf * cv[q]) * pre(gv[q]);
          if (rest) u = Gr::ids(q) < rest ? u : VF{};
          fu.v[q] += u * u;
        }
      };
      int64_t j = b;
      for (; j + kLanes <= be; j += kLanes) {
        if ((j & (kPrefetchRun - 1)) == 0) prefetch_run_ahead<0>(g + j);  // cpu_vec.h
        group(g + j, j, 0);
      }
      if (j < be) group(Padded<K::GF>(g + j, static_cast<int>(be - j)).v, j,
                        static_cast<int>(be - j));
      uu.add(Gr::logical(fu));
    }
  }
  c.w.slots[unit].uu = uu.sum();
}
LOMO_CPU_CLONES(fac_unorm)

// ---- stage 3 pass: apply; commit this tile's share of the new state -------------------------
// With AdaStep::clean, the loop runs in explicit vectors with no NaN select (stochastic rounding:
// the hash in the same vectors), and no multiply by a decay of exactly 1 (bitwise the same
// results).
template <class K, int W>
LOMO_CPU_INLINE void fac_apply(const FacCtx& c, int64_t unit) {
  constexpr Fmt F = K::F;
  using S = storage_t<F>;
  using SG = storage_t<K::GF>;
  const Geo& geo = c.geo;
  const Tile t = tile_of(geo, unit);
  const float scale = c.s.scale, clip = c.s.clip, coef = c.coef;
  const float denom = c.st.denom, decay = c.st.decay, lr_t = c.st.lr_t;
  const uint32_t key = c.s.key;
  const float mean = mean_r(c, t.s);
  const float* __restrict cf = c.w.cfac + t.s * geo.n + t.c0;
  const bool clean = c.st.clean;
  // bf16 p and g on AVX2: bf16_pairs.h's word pairs, with this tile's c_j copied once into the
  // same lane order (even columns of each 16, then odd), so no load in the loop shuffles; the
  // other formats and clones: cpu_vec.h's Group, which loads the fp32 c_j in its own order.
  constexpr bool kPairs = kBf16Pairs<F, K::GF, W>;
  alignas(64) float cpair[kPairs ? kTileCols : 1];
  if constexpr (kPairs) {
    if (clean) cols_in_lane_order<Bf16Pairs<W>, W>(cpair, cf, t.w);
  }
  for (int64_t r = t.r0; r < t.r1; ++r) {
    const int64_t row = t.s * geo.m + r;
    const float rf = 1.0f / std::sqrt(c.w.newr[row] / mean);
    int64_t begin = row * geo.n + t.c0;
    const int64_t end = begin + t.w;
    const float* __restrict cfj = cf;
    // (rf * c_j) * g: u of element j
    const auto u_of = [&](const SG* __restrict g, int64_t j) __attribute__((always_inline)) {
      return (rf * cfj[j]) * preprocess<K::DIV, K::CLIP>(to_f32<K::GF>(g[j]), scale, clip, coef);
    };
    // 16 elements at a time in vectors (the group G: Bf16Pairs reading c_j from cpair, or Group
    // reading it from cfj), then the tail element by element
    const auto clean_run = [&](auto pairs, S* __restrict p, const SG* __restrict g, int64_t len,
                               float dec, uint32_t lo, uint32_t hk) __attribute__((always_inline)) {
      constexpr bool PAIRS = decltype(pairs)::value;
      using G = std::conditional_t<PAIRS, Bf16Pairs<8>, Group<F, W>>;
      using VF = typename Vec<W>::F;
      const VPre<K::DIV, W, K::CLIP> pre(scale, clip, coef);
      const VF rfv = splat<W>(rf), den = splat<W>(denom), decv = splat<W>(dec);
      const VF lrv = splat<W>(lr_t);
      int64_t j = 0;
      for (; j + kLanes <= len; j += kLanes) {
        if ((j & (kPrefetchRun - 1)) == 0) {  // cpu_vec.h
          prefetch_run_ahead<0>(g + j);
          prefetch_run_ahead<1>(p + j);
        }
        VF gv[G::P], pv[G::P], cv[G::P];
        if constexpr (PAIRS) {
          G::load(g + j, gv);
          G::load(p + j, pv);
          std::memcpy(cv, cpair + j, sizeof cv);
        } else {
          group_load<K::GF, F, W>(g + j, gv);
          G::load(p + j, pv);
          G::load_f32(cfj + j, cv);
        }
        for (int q = 0; q < G::P; ++q) {
          const VF u = (rfv * cv[q]) * pre(gv[q]);
          pv[q] = pv[q] * decv - lrv * (K::DEN1 ? u : u / den);
        }
        G::template store_clean<K::SR>(p + j, pv, lo + static_cast<uint32_t>(j), hk);
      }
      for (; j < len; ++j)
        p[j] = apply_one_clean<F, K::SR, K::DEN1>(denom, dec, lr_t, p[j], u_of(g, j),
                                                  lo + static_cast<uint32_t>(j), hk);
    };
    // a whole row of the tile (not split by the hash's key below) can use cpair
    const auto clean_any = [&](S* __restrict p, const SG* __restrict g, int64_t len, float dec,
                               uint32_t lo, uint32_t hk) __attribute__((always_inline)) {
      if (kPairs && len == t.w)
        clean_run(std::bool_constant<kPairs>{}, p, g, len, dec, lo, hk);
      else
        clean_run(std::false_type{}, p, g, len, dec, lo, hk);
    };
    while (begin < end) {  // split where the hash's high half changes
      const int64_t stop = std::min(end, ((begin >> 32) + 1) << 32);
      const uint32_t hk = hash_high_key(key, static_cast<uint64_t>(begin));
      const uint32_t lo = static_cast<uint32_t>(begin);
      S* __restrict p = static_cast<S*>(c.p) + begin;
      const SG* __restrict g = static_cast<const SG*>(c.g) + begin;
      const int64_t len = stop - begin;
      if (clean && decay == 1.0f) {
        clean_any(p, g, len, 1.0f, lo, hk);
      } else if (clean) {
        clean_any(p, g, len, decay, lo, hk);
      } else {
        for (int64_t j = 0; j < len; ++j) {
          const uint32_t bits = K::SR ? mix32((lo + static_cast<uint32_t>(j)) ^ hk) : 0u;
          p[j] = apply_one<F, K::SR, K::DEN1>(denom, decay, lr_t, p[j], u_of(g, j), bits);
        }
      }
      cfj += len;
      begin = stop;
    }
  }
  if (t.cb == 0)
    std::memcpy(c.r + t.s * geo.m + t.r0, c.w.newr + t.s * geo.m + t.r0,
                sizeof(float) * static_cast<size_t>(t.r1 - t.r0));
  if (t.rg == 0)
    std::memcpy(c.c + t.s * geo.n + t.c0, c.w.cnew + t.s * geo.n + t.c0,
                sizeof(float) * static_cast<size_t>(t.w));
}
LOMO_CPU_CLONES(fac_apply)

// new c = beta * c + (1 - beta) * colsum / rows (torch.add(c * b, mean, alpha=1-b): one fma)
// and its rsqrt, for the columns [j0, j1) of all slices' flat index.
void new_col_state(const FacCtx& c, int64_t j0, int64_t j1) {
  const float b = c.s.beta, omb = c.s.one_minus_beta;
  const float* colsum = c.hdr + kHeader + c.geo.S;
  for (int64_t j = j0; j < j1; ++j) {
    const float mean = static_cast<float>(static_cast<double>(colsum[j]) /
                                          static_cast<double>(c.rows_g));
    c.w.cnew[j] = std::fma(mean, omb, c.c[j] * b);
    c.w.cfac[j] = 1.0f / std::sqrt(c.w.cnew[j]);
  }
}

// The phase after the stage-1 pass: unit u < S makes the new r of slice u and sum(r); the others
// one run of kColRun columns of a slice each: its column sums into the header and, in one call
// (FacCtx::fused_c), the new c at once (no all-reduce comes in between). Each unit writes only its
// own outputs, each sum in a fixed order.
int64_t finalize_units(const Geo& g) { return g.S + g.S * ceil_div(g.n, kColRun); }

void fac_finalize(const FacCtx& c, int64_t u) {
  const Geo& g = c.geo;
  const int64_t runs = ceil_div(g.n, kColRun);
  const float b = c.s.beta, omb = c.s.one_minus_beta;
  if (u < g.S) {  // r = b * r + (1 - b) * mean(G, -1): one fma, as torch.add(.., alpha)
    double sum_r = 0.0;
    for (int64_t i = u * g.m; i < (u + 1) * g.m; ++i) {
      double rs = 0.0;
      for (int64_t cb = 0; cb < g.ncb; ++cb) rs += c.w.rowpart[cb * g.S * g.m + i];
      const float r = std::fma(static_cast<float>(rs / static_cast<double>(g.n)), omb,
                               c.r[i] * b);
      c.w.newr[i] = r;
      sum_r += r;
    }
    c.hdr[kHeader + u] = static_cast<float>(sum_r);
    return;
  }
  const int64_t s = (u - g.S) / runs, j0 = ((u - g.S) % runs) * kColRun;
  const int64_t len = std::min(g.n - j0, kColRun);
  double sum[kColRun];
  for (int64_t j = 0; j < len; ++j) sum[j] = 0.0;
  for (int64_t rg = 0; rg < g.nrb; ++rg) {
    const double* __restrict cp = c.w.colpart + (s * g.nrb + rg) * g.n + j0;
    for (int64_t j = 0; j < len; ++j) sum[j] += cp[j];
  }
  float* colsum = c.hdr + kHeader + g.S + s * g.n + j0;
  for (int64_t j = 0; j < len; ++j) colsum[j] = static_cast<float>(sum[j]);
  if (c.fused_c) new_col_state(c, s * g.n + j0, s * g.n + j0 + len);
}

template <class T, class Get>
T sum_slots(const Slot* slots, int64_t n, Get get) {
  T s = 0;
  for (int64_t u = 0; u < n; ++u) s += get(slots[u]);
  return s;
}

// The stages of a factored parameter, in one parallel region (parallel_phases): stage 0 runs the
// three passes and stops after the first on a non-finite gradient; 1, 2, 3 run one pass each.
void factored_update(FacCtx& c, const AdaCall& a, at::ScalarType dtype,
                     at::ScalarType grad_dtype) {
  using Fn = void (*)(const FacCtx&, int64_t);
  enum Pass { kStats, kFinalize, kUnorm, kApply };
  const Geo& g = c.geo;
  float* h = c.hdr;
  Pass pass[4];
  int n = 0;
  if (a.stage <= 1) {
    pass[n++] = kStats;
    pass[n++] = kFinalize;
  }
  if (a.stage == 0 || a.stage == 2) pass[n++] = kUnorm;
  if (a.stage == 0 || a.stage == 3) pass[n++] = kApply;
  c.fused_c = a.stage == 0;
  Fn fn[4] = {};
  for (int k = 0; k < n; ++k) {
    if (pass[k] == kStats)
      dispatch_flags<kUseDIV | kUseGSQ | kUseCLIP | kUseG32>(
          dtype, false, a.div, a.grad_sq != nullptr, false, a.clip,
          [&](auto f) { fn[k] = fac_stats_pick<decltype(f), FacCtx>(); }, grad_dtype);
    if (pass[k] == kFinalize) fn[k] = &fac_finalize;
    if (pass[k] == kUnorm)
      dispatch_flags<kUseDIV | kUseCLIP | kUseG32>(
          dtype, false, a.div, false, false, a.clip,
          [&](auto f) { fn[k] = fac_unorm_pick<decltype(f), FacCtx>(); }, grad_dtype);
  }
  // Before the apply pass: its scalars and loop (update clipping inactive: no division).
  const auto prepare_apply = [&](int k) {
    c.st = step_scalars(c.s, h[0], h[2], a.numel_g);
    dispatch_flags<kUseSR | kUseDIV | kUseDEN1 | kUseCLIP | kUseG32>(
        dtype, a.sr, a.div, false, c.st.denom == 1.0f, a.clip,
        [&](auto f) { fn[k] = fac_apply_pick<decltype(f), FacCtx>(); }, grad_dtype);
  };
  bool skip = false;  // a non-finite gradient: no further pass
  if (a.stage == 2) {  // the new c from the all-reduced column sums
    new_col_state(c, 0, g.S * g.n);
    if (h[1] > 0) {
      h[2] = 0.0f;
      return;
    }
  }
  if (a.stage == 3) {
    if (h[1] > 0) return set_found(a.found);
    prepare_apply(0);
  }
  const auto between = [&](int k) {
    if (pass[k] == kStats) {
      h[0] = static_cast<float>(sum_slots<double>(c.w.slots, g.units, [](const Slot& s) { return s.pp; }));
      h[1] = sum_slots<uint32_t>(c.w.slots, g.units, [](const Slot& s) { return s.bad; }) ? 1.0f : 0.0f;
      if (a.grad_sq && g.units)
        a.grad_sq[0] += static_cast<float>(
            sum_slots<double>(c.w.slots, g.units, [](const Slot& s) { return s.gsq; }));
    } else if (pass[k] == kFinalize) {
      if (a.stage == 0 && h[1] > 0) {
        set_found(a.found);
        skip = true;
      }
    } else if (pass[k] == kUnorm && !skip) {
      h[2] = static_cast<float>(sum_slots<double>(c.w.slots, g.units, [](const Slot& s) { return s.uu; }));
      if (a.stage == 0) prepare_apply(k + 1);
    }
  };
  parallel_phases(
      n,
      [&](int k) {
        if (pass[k] == kFinalize) return finalize_units(g);  // also after a non-finite gradient
        return skip ? int64_t{0} : g.units;
      },
      [&](int k, int64_t u) { fn[k](c, u); }, between);
  if (pass[n - 1] == kApply && !skip && g.units == 0)  // an empty shard commits its copy of c
    std::memcpy(c.c, c.w.cnew, sizeof(float) * static_cast<size_t>(g.S * g.n));
}

}  // namespace

int64_t factored_workspace_numel(c10::IntArrayRef shape) {
  return factored_numel(factored_geo(shape));
}

void factored_adalomo(const AdaCall& a, const at::Tensor& param, const at::Tensor& grad, float* r,
                      float* c, int64_t global_rows, const std::optional<at::Tensor>& workspace) {
  FacCtx x{};
  x.geo = factored_geo(param.sizes());
  Scratch scratch("adalomo_update_", workspace, factored_numel(x.geo));
  Carver cv = scratch.carver(header_floats(x.geo));
  x.w = carve_factored(cv, x.geo);
  x.s = a.s;
  x.coef = a.coef;
  x.p = param.data_ptr();
  x.g = grad.data_ptr();
  x.hdr = scratch.header();
  x.r = r;
  x.c = c;
  x.rows_g = global_rows ? global_rows : x.geo.m;
  factored_update(x, a, param.scalar_type(), grad.scalar_type());
}

}  // namespace cpu
}  // namespace lomo
