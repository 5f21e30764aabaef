// AdaLomo on CUDA (docs/spec.md): one launch per pass, no host synchronisation, and with the
// caller's workspace no allocation and no memset.
//
// Factored (dim >= 2, batched over leading dims): tiles of `rpt` rows x TC = 32 * N columns inside
// one [m, n] slice; lane l owns N consecutive columns (one 16-byte load), warp w the rows w, w + 8,
// ..., four rows per step with every load issued before the math.
//   pass 1 (stats):  per tile: row sums of G = g*g + eps1 over its columns, column sums over its
//       rows, sum(p*p), sum(g_unscaled^2), a bad flag. Finalisation by tickets (reduce.cuh):
//       the last column block of a row block sums the row partials -> new r (kept in the
//       workspace) and its sum; the last row block of a slice -> sum r of the slice; columns in two
//       levels (the last tile of a group of kColGroup row blocks sums the group, the last group
//       sums the groups) -> the header's column sums; the last tile overall -> sum_pp, bad, grad_sq.
//   pass 2 (unorm):  new c from the header (kept in the workspace), sum(u*u) per tile, the last
//       tile -> header[2].
//   pass 3 (apply):  lr_t, decay and denom from the header (every block computes the same floats),
//       p = p*decay - lr_t*u/denom (no division when denom == 1), round, store; the state (r', c')
//       is committed here only, by the tiles of the first column / row block.
// The workspace header is the public one of reference.py (WS_*), so stages 1/2/3 (sharded
// parameters) are exactly these passes with an all-reduce between them.
// Unfactored (0-d / 1-d) and the multi-tensor op: adalomo_flat.cuh (1 launch, 2 for large tensors).
//
// Cost: 12 bytes per bf16 element (pass 1 reads g, p; pass 2 g; pass 3 g, p and writes p). The
// workspace is O(rows * column blocks + columns * row blocks + tiles) floats with at most
// kMaxRowBlocks row blocks per slice. Determinism: every reduction has a fixed order that depends on
// the shape only; tickets decide who reduces, never the order.
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <string_view>
#include <vector>

#include "checks.h"
#include "cuda/adalomo_flat.cuh"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace LOMO_CUDA_NS {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kRowUnroll = 4;                    // rows per warp per step
constexpr int kRowStep = kWarps * kRowUnroll;    // rows per block step
constexpr int kStatsUnroll = 2;                  // pass 1 keeps 8 column sums live: 2 rows
constexpr int kApplyUnroll = 1;                  // pass 3: g and p of one row (64 registers)
constexpr int kMinTileRows = 64;
constexpr int64_t kMaxRowBlocks = 64;            // row blocks per slice (bounds the workspace)
constexpr int64_t kColGroup = 8;                 // row blocks per first-level column reduction
constexpr int kHeader = 4;                       // reference.WS_HEADER

// Tiling of a factored parameter for TC columns per tile.
struct Geom {
  int64_t S, m, n;         // slices of m x n (local rows)
  int64_t rpt, nrb, ncb;   // rows per tile, row blocks per slice, column blocks
  int64_t ngroups, T;      // column-reduction groups per slice, tiles
};

// `shift`: the column grid starts that many columns before column 0 (alignment peeling, see Args).
Geom make_geom(int64_t S, int64_t m, int64_t n, int64_t TC, int64_t shift) {
  Geom g{S, m, n, kMinTileRows, 0, ceil_div(n + shift, TC), 0, 0};
  if (m > 0) {
    const int64_t target = std::min(ceil_div(m, kMinTileRows), kMaxRowBlocks);
    g.rpt = ceil_div(ceil_div(m, target), kRowStep) * kRowStep;
    g.nrb = ceil_div(m, g.rpt);
  }
  g.ngroups = ceil_div(g.nrb, kColGroup);
  g.T = S * g.nrb * g.ncb;
  return g;
}

// The workspace of one factored parameter (floats; tickets are ints in float slots).
struct Layout {
  float *header, *sum_r, *colsum;  // the public header: [4], [S], [S * n]
  float* new_r;                    // [S * m]
  float* cnew;                     // [S * n]
  float* rowpart;                  // [ncb][S * m]
  float* colpart;                  // [S * nrb][n]
  float* colpart2;                 // [S * ngroups][n]
  float* rpart;                    // [S * nrb]
  float* parts;                    // [4][T]: pp, gsq, uu, bad
  int *row_ticket, *col_ticket1, *col_ticket2, *slice_ticket, *done;
};

// Lays out a workspace (see Carver); returns the floats it needs.
int64_t carve(const Geom& g, Carver c, Layout* L) {
  const int64_t S = g.S, m = g.m, n = g.n;
  Layout l;
  l.header = c.data(kHeader);
  l.sum_r = c.data(S);
  l.colsum = c.data(S * n);
  l.new_r = c.data(S * m);
  l.cnew = c.data(S * n);
  l.rowpart = c.data(g.ncb * S * m);
  l.colpart = c.data(S * g.nrb * n);
  l.colpart2 = c.data(S * g.ngroups * n);
  l.rpart = c.data(S * g.nrb);
  l.parts = c.data(4 * g.T);
  l.row_ticket = c.tickets(S * g.nrb);
  l.col_ticket1 = c.tickets(S * g.ncb * g.ngroups);
  l.col_ticket2 = c.tickets(S * g.ncb);
  l.slice_ticket = c.tickets(S);
  l.done = c.tickets(2);
  if (L) *L = l;
  return c.need();
}

struct Args {
  void* p;
  const void* g;
  float *row_state, *col_state;
  const float* clip_coef;
  float* found_inf;
  float* grad_sq;
  AdaLomoScalars s;
  Geom geo;
  Layout ws;
  float global_rows;    // the rows means divide by (float, as the reference's / int)
  double global_numel;  // the elements rms divides by
  // 16-byte packs: n % N == 0 and p, g at the same offset modulo 16 bytes. Every row then starts
  // `head` elements before a 16-byte boundary; the column grid is shifted left by shift =
  // (N - head) % N so that every pack but each row's first starts on a boundary (peeling).
  bool vec;
  int shift;
};

struct TilePos {
  int64_t cb, srb, slice, rb, r0, rend, c0;
  int lane, warp;
};

template <int TC, int N>
__device__ __forceinline__ TilePos tile_pos(const Args& a) {
  TilePos t;
  const int64_t tile = blockIdx.x;
  t.cb = tile % a.geo.ncb;
  t.srb = tile / a.geo.ncb;
  t.slice = t.srb / a.geo.nrb;
  t.rb = t.srb % a.geo.nrb;
  t.r0 = t.rb * a.geo.rpt;
  t.rend = t.r0 + a.geo.rpt < a.geo.m ? t.r0 + a.geo.rpt : a.geo.m;
  const unsigned tid = fresh_thread_index();
  t.lane = tid & 31;
  t.warp = tid >> 5;
  t.c0 = t.cb * TC + t.lane * N - a.shift;
  return t;
}

__device__ __forceinline__ bool valid_col(int64_t c, int64_t n) { return c >= 0 && c < n; }

// The N columns from c0 of one row (`row` points at its column 0).
// (Kept as a Pack: 16-bit values stay two to a register.)
template <typename S>
__device__ __forceinline__ void load_cols(const S* row, Pack<S>& dst, int64_t c0, int64_t n,
                                          bool full) {
  constexpr int N = Pack<S>::N;
  if (full) {
    dst = load_pack(row + c0);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) dst.v[k] = valid_col(c0 + k, n) ? row[c0 + k] : S(0);
  }
}

// ---- pass 1 ---------------------------------------------------------------------------------------

// The last column block of a row block: new r of its rows and their sum; the last row block of the
// slice: sum r of the slice (header).
__device__ void finish_rows(const Args& a, const TilePos& t, double* dred, int* flag) {
  const Geom& geo = a.geo;
  const int64_t rows = geo.S * geo.m;
  double racc = 0.0;
  for (int64_t r = t.r0 + fresh_thread_index(); r < t.rend; r += kThreads) {
    const int64_t row = t.slice * geo.m + r;
    double sum = 0.0;
    for (int64_t cb = 0; cb < geo.ncb; ++cb) sum += __ldcg(a.ws.rowpart + cb * rows + row);
    const float mean = static_cast<float>(sum / static_cast<double>(geo.n));
    const float rn = __fmaf_rn(mean, a.s.one_minus_beta, __fmul_rn(a.row_state[row], a.s.beta));
    a.ws.new_r[row] = rn;
    racc += rn;
  }
  racc = block_sum<kThreads>(racc, dred);
  if (fresh_thread_index() == 0) a.ws.rpart[t.srb] = static_cast<float>(racc);
  if (last_arrival(a.ws.slice_ticket + t.slice, static_cast<int>(geo.nrb), flag)) {
    const double sr = sum_in_order(a.ws.rpart + t.slice * geo.nrb, geo.nrb, dred);
    if (fresh_thread_index() == 0) a.ws.sum_r[t.slice] = static_cast<float>(sr);
  }
}

// Column sums in two levels: the group of row blocks, then the groups of the slice.
template <int TC>
__device__ void finish_cols(const Args& a, const TilePos& t, int* flag) {
  const Geom& geo = a.geo;
  const int64_t group = t.rb / kColGroup;
  const int64_t first = group * kColGroup;
  const int64_t size = geo.nrb - first < kColGroup ? geo.nrb - first : kColGroup;
  const unsigned tid = fresh_thread_index();
  const int64_t col = t.cb * TC + tid - a.shift;
  int* t1 = a.ws.col_ticket1 + (t.slice * geo.ncb + t.cb) * geo.ngroups + group;
  if (!last_arrival(t1, static_cast<int>(size), flag)) return;
  if (tid < TC && valid_col(col, geo.n)) {
    double sum = 0.0;
    for (int64_t rb = first; rb < first + size; ++rb)
      sum += __ldcg(a.ws.colpart + (t.slice * geo.nrb + rb) * geo.n + col);
    float* out = geo.ngroups == 1 ? a.ws.colsum + t.slice * geo.n
                                  : a.ws.colpart2 + (t.slice * geo.ngroups + group) * geo.n;
    out[col] = static_cast<float>(sum);
  }
  if (geo.ngroups == 1) return;
  if (!last_arrival(a.ws.col_ticket2 + t.slice * geo.ncb + t.cb, static_cast<int>(geo.ngroups),
                    flag))
    return;
  if (tid < TC && valid_col(col, geo.n)) {
    double sum = 0.0;
    for (int64_t gr = 0; gr < geo.ngroups; ++gr)
      sum += __ldcg(a.ws.colpart2 + (t.slice * geo.ngroups + gr) * geo.n + col);
    a.ws.colsum[t.slice * geo.n + col] = static_cast<float>(sum);
  }
}

template <Fmt F, bool DIV>
__global__ void __launch_bounds__(kThreads, 3) stats_kernel(const Args a) {
  using S = storage_t<F>;
  constexpr int N = Pack<S>::N;
  constexpr int TC = 32 * N;
  __shared__ float col_smem[kWarps * TC];
  __shared__ float red[32];
  __shared__ double dred[32];
  __shared__ int flag;
  const Geom& geo = a.geo;
  const TilePos t = tile_pos<TC, N>(a);
  const S* p = static_cast<const S*>(a.p);
  const S* g = static_cast<const S*>(a.g);
  const bool active = t.c0 + N > 0 && t.c0 < geo.n;
  const bool full = a.vec && t.c0 >= 0 && t.c0 + N <= geo.n;
  const float coef = a.clip_coef ? *a.clip_coef : 1.0f;
  const int64_t rows = geo.S * geo.m;

  float colacc[N];
#pragma unroll
  for (int k = 0; k < N; ++k) colacc[k] = 0.0f;
  float pp = 0.0f, gsq = 0.0f;
  bool bad = false;
  for (int64_t r = t.r0 + t.warp; r - t.warp < t.rend; r += kWarps * kStatsUnroll) {
    Pack<S> gv[kStatsUnroll], pv[kStatsUnroll];
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {  // every load of the step first
      const int64_t ru = r + u * kWarps;
      if (ru < t.rend && active) {
        const int64_t row0 = (t.slice * geo.m + ru) * geo.n;
        load_cols(g + row0, gv[u], t.c0, geo.n, full);
        load_cols(p + row0, pv[u], t.c0, geo.n, full);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) gv[u].v[k] = pv[u].v[k] = S(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      const int64_t ru = r + u * kWarps;
      float rowsum = 0.0f;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (ru < t.rend && valid_col(t.c0 + k, geo.n)) {
          const float graw = to_f32<F>(gv[u].v[k]);
          bad |= !is_finite_f32(graw);
          const float gu = unscale<DIV>(graw, a.s.scale);
          gsq += gu * gu;
          const float gp = clip_scale(gu, a.s.clip, coef);
          const float G = __fadd_rn(__fmul_rn(gp, gp), a.s.eps1);
          rowsum += G;
          colacc[k] += G;
          const float pf = to_f32<F>(pv[u].v[k]);
          pp += pf * pf;
        }
      }
      rowsum = warp_sum(rowsum);  // ru < rend is the same in every lane
      if (t.lane == 0 && ru < t.rend) a.ws.rowpart[t.cb * rows + t.slice * geo.m + ru] = rowsum;
    }
  }
#pragma unroll
  for (int k = 0; k < N; ++k) col_smem[t.warp * TC + t.lane * N + k] = colacc[k];
  __syncthreads();
  const unsigned tid = fresh_thread_index();
  if (tid < TC) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += col_smem[w * TC + tid];
    const int64_t col = t.cb * TC + tid - a.shift;
    if (valid_col(col, geo.n)) a.ws.colpart[t.srb * geo.n + col] = sum;
  }
  pp = block_sum<kThreads>(pp, red);
  gsq = block_sum<kThreads>(gsq, red);
  bad = __syncthreads_or(bad) != 0;
  const int64_t tile = blockIdx.x;
  if (tid == 0) {
    a.ws.parts[tile] = pp;
    a.ws.parts[geo.T + tile] = gsq;
    a.ws.parts[3 * geo.T + tile] = bad ? 1.0f : 0.0f;
  }
  if (last_arrival(a.ws.row_ticket + t.srb, static_cast<int>(geo.ncb), &flag))
    finish_rows(a, t, dred, &flag);
  finish_cols<TC>(a, t, &flag);
  if (last_arrival(a.ws.done, static_cast<int>(geo.T), &flag)) {
    const double spp = sum_in_order(a.ws.parts, geo.T, dred);
    const double sgsq = sum_in_order(a.ws.parts + geo.T, geo.T, dred);
    const bool any_bad = any_in(a.ws.parts + 3 * geo.T, geo.T);
    if (tid == 0) {
      a.ws.header[0] = static_cast<float>(spp);
      a.ws.header[1] = any_bad ? 1.0f : 0.0f;
      a.ws.header[2] = 0.0f;
      if (a.grad_sq) *a.grad_sq += static_cast<float>(sgsq);
    }
  }
}

// ---- passes 2 and 3 -------------------------------------------------------------------------------

// mean(r) of the slice and rsqrt(c') of this lane's columns (pass 2 computes c' and keeps it).
template <int N, bool FROM_HEADER>
__device__ __forceinline__ float factors(const Args& a, const TilePos& t, float* cf) {
  const Geom& geo = a.geo;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const int64_t c = t.c0 + k;
    cf[k] = 0.0f;
    if (valid_col(c, geo.n)) {
      const int64_t i = t.slice * geo.n + c;
      float cn;
      if (FROM_HEADER) {
        // torch.add(c * beta, colsum / rows, alpha=1-beta): one fma, as the reference
        cn = __fmaf_rn(__fdiv_rn(__ldcg(a.ws.colsum + i), a.global_rows), a.s.one_minus_beta,
                       __fmul_rn(a.col_state[i], a.s.beta));
        if (t.rb == 0 && t.warp == 0) a.ws.cnew[i] = cn;
      } else {
        cn = __ldcg(a.ws.cnew + i);
      }
      cf[k] = 1.0f / sqrtf(cn);
    }
  }
  return __fdiv_rn(__ldcg(a.ws.sum_r + t.slice), a.global_rows);
}

template <Fmt F, bool DIV>
__global__ void __launch_bounds__(kThreads, 3) unorm_kernel(const Args a) {
  using S = storage_t<F>;
  constexpr int N = Pack<S>::N;
  constexpr int TC = 32 * N;
  __shared__ float red[32];
  __shared__ double dred[32];
  __shared__ int flag;
  if (__ldcg(a.ws.header + 1) > 0.0f) return;  // the same in every block: no ticket taken
  const Geom& geo = a.geo;
  const TilePos t = tile_pos<TC, N>(a);
  const S* g = static_cast<const S*>(a.g);
  const bool active = t.c0 + N > 0 && t.c0 < geo.n;
  const bool full = a.vec && t.c0 >= 0 && t.c0 + N <= geo.n;
  const float coef = a.clip_coef ? *a.clip_coef : 1.0f;
  float cf[N];
  const float mean_r = factors<N, true>(a, t, cf);
  float uu = 0.0f;
  for (int64_t r = t.r0 + t.warp; r - t.warp < t.rend; r += kRowStep) {
    Pack<S> gv[kRowUnroll];
    float rf[kRowUnroll];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      const int64_t ru = r + u * kWarps;
      rf[u] = 0.0f;
      if (ru < t.rend && active) {
        const int64_t row = t.slice * geo.m + ru;
        load_cols(g + row * geo.n, gv[u], t.c0, geo.n, full);
        rf[u] = __ldcg(a.ws.new_r + row);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) gv[u].v[k] = S(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      if (r + u * kWarps >= t.rend || !active) continue;
      // rsqrt(r / mean(r)), with IEEE division and sqrt as torch's CPU reference
      const float rs = 1.0f / sqrtf(__fdiv_rn(rf[u], mean_r));
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float gp =
            clip_scale(unscale<DIV>(to_f32<F>(gv[u].v[k]), a.s.scale), a.s.clip, coef);
        const float uval = __fmul_rn(__fmul_rn(rs, cf[k]), gp);
        uu += valid_col(t.c0 + k, geo.n) ? uval * uval : 0.0f;
      }
    }
  }
  uu = block_sum<kThreads>(uu, red);
  if (fresh_thread_index() == 0) a.ws.parts[2 * geo.T + blockIdx.x] = uu;
  if (last_arrival(a.ws.done + 1, static_cast<int>(geo.T), &flag)) {
    const double suu = sum_in_order(a.ws.parts + 2 * geo.T, geo.T, dred);
    if (fresh_thread_index() == 0) a.ws.header[2] = static_cast<float>(suu);
  }
}

template <Fmt F, bool SR, bool DIV, bool DIVIDE_U>
__device__ __forceinline__ void apply_rows(const Args& a, const TilePos& t, const float* cf,
                                           float mean_r, float coef, float lr_t, float decay,
                                           float denom) {
  using S = storage_t<F>;
  constexpr int N = Pack<S>::N;
  const Geom& geo = a.geo;
  S* p = static_cast<S*>(a.p);
  const S* g = static_cast<const S*>(a.g);
  const bool active = t.c0 + N > 0 && t.c0 < geo.n;
  const bool full = a.vec && t.c0 >= 0 && t.c0 + N <= geo.n;
  for (int64_t r = t.r0 + t.warp; r - t.warp < t.rend; r += kWarps * kApplyUnroll) {
    Pack<S> gv[kApplyUnroll], pv[kApplyUnroll];
    float rf[kApplyUnroll];
#pragma unroll
    for (int u = 0; u < kApplyUnroll; ++u) {
      const int64_t ru = r + u * kWarps;
      rf[u] = 0.0f;
      if (ru < t.rend && active) {
        const int64_t row = t.slice * geo.m + ru;
        load_cols(g + row * geo.n, gv[u], t.c0, geo.n, full);
        load_cols(p + row * geo.n, pv[u], t.c0, geo.n, full);
        rf[u] = __ldcg(a.ws.new_r + row);
      }
    }
#pragma unroll
    for (int u = 0; u < kApplyUnroll; ++u) {
      const int64_t ru = r + u * kWarps;
      if (ru >= t.rend || !active) continue;
      const int64_t base = (t.slice * geo.m + ru) * geo.n + t.c0;
      const float rs = 1.0f / sqrtf(__fdiv_rn(rf[u], mean_r));
      // a shifted (peeled) pack may cross a multiple of 2**32 (pack_bits)
      const uint32_t hk = SR ? hash_high_key(a.s.key, base) : 0u;
      const bool crosses = SR && static_cast<uint32_t>(base) > 0xFFFFFFFFu - (N - 1);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float gp =
            clip_scale(unscale<DIV>(to_f32<F>(gv[u].v[k]), a.s.scale), a.s.clip, coef);
        float uval = __fmul_rn(__fmul_rn(rs, cf[k]), gp);
        if (DIVIDE_U) uval = __fdiv_rn(uval, denom);
        const float nv = __fsub_rn(__fmul_rn(to_f32<F>(pv[u].v[k]), decay), __fmul_rn(lr_t, uval));
        uint32_t bits = 0u;
        if (SR) bits = full ? pack_bits(a.s.key, hk, base, k, crosses)
                            : random_bits(a.s.key, base + k);
        pv[u].v[k] = from_f32<F, SR>(nv, bits);
      }
      if (full) {
        Pack<S> out;  // (a fresh pack: storing pv[u] itself compiled to 16-bit stores)
#pragma unroll
        for (int k = 0; k < N; ++k) out.v[k] = pv[u].v[k];
        store_pack(p + base, out);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k)
          if (valid_col(t.c0 + k, geo.n)) p[base + k] = pv[u].v[k];
      }
    }
  }
}

// 64 registers (4 blocks per SM); a non-power-of-two loss scale (an IEEE division per element)
// needs more: 3 blocks.
template <Fmt F, bool SR, bool DIV>
__global__ void __launch_bounds__(kThreads, DIV ? 3 : 4) apply_kernel(const Args a) {
  using S = storage_t<F>;
  constexpr int N = Pack<S>::N;
  constexpr int TC = 32 * N;
  const float* h = a.ws.header;
  if (__ldcg(h + 1) > 0.0f) {
    if (blockIdx.x == 0 && fresh_thread_index() == 0 && a.found_inf) *a.found_inf = 1.0f;
    return;
  }
  const TilePos t = tile_pos<TC, N>(a);
  const float coef = a.clip_coef ? *a.clip_coef : 1.0f;
  const float lr_t = adalomo_lr_t(a.s, rms_of(__ldcg(h + 0), a.global_numel));
  const float decay = adalomo_decay(a.s, lr_t);
  const float denom = adalomo_denom(a.s, rms_of(__ldcg(h + 2), a.global_numel));
  float cf[N];
  const float mean_r = factors<N, false>(a, t, cf);
  if (denom == 1.0f)  // u / 1 == u exactly: no division per element
    apply_rows<F, SR, DIV, false>(a, t, cf, mean_r, coef, lr_t, decay, denom);
  else
    apply_rows<F, SR, DIV, true>(a, t, cf, mean_r, coef, lr_t, decay, denom);
  // commit the state (read by no block of this pass): r' by the first column block, c' by the
  // first row block
  const Geom& geo = a.geo;
  if (t.cb == 0) {
    for (int64_t r = t.r0 + fresh_thread_index(); r < t.rend; r += kThreads) {
      const int64_t row = t.slice * geo.m + r;
      a.row_state[row] = __ldcg(a.ws.new_r + row);
    }
  }
  if (t.rb == 0 && t.warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int64_t c = t.c0 + k;
      if (valid_col(c, geo.n)) a.col_state[t.slice * geo.n + c] = __ldcg(a.ws.cnew + t.slice * geo.n + c);
    }
  }
}

// A rank whose shard has no local rows (stages only): pass 1 zeroes its header contribution;
// pass 2 computes c' from the reduced column sums; pass 3 commits c' (or sets found_inf).
__global__ void __launch_bounds__(kThreads) empty_shard_kernel(const Args a, int pass) {
  const int64_t cols = a.geo.S * a.geo.n;
  const unsigned tid = fresh_thread_index();
  if (pass == 1) {
    if (tid < 3) a.ws.header[tid] = 0.0f;
    for (int64_t i = tid; i < a.geo.S; i += kThreads) a.ws.sum_r[i] = 0.0f;
    for (int64_t i = tid; i < cols; i += kThreads) a.ws.colsum[i] = 0.0f;
    return;
  }
  const bool bad = __ldcg(a.ws.header + 1) > 0.0f;
  if (pass == 2) {
    if (tid == 0) a.ws.header[2] = 0.0f;
    if (bad) return;
    for (int64_t i = tid; i < cols; i += kThreads)
      a.ws.cnew[i] = __fmaf_rn(__fdiv_rn(__ldcg(a.ws.colsum + i), a.global_rows),
                               a.s.one_minus_beta, __fmul_rn(a.col_state[i], a.s.beta));
    return;
  }
  if (bad) {
    if (tid == 0 && a.found_inf) *a.found_inf = 1.0f;
    return;
  }
  for (int64_t i = tid; i < cols; i += kThreads) a.col_state[i] = __ldcg(a.ws.cnew + i);
}

// ---- host -------------------------------------------------------------------------------------------

constexpr int64_t kMinTC = 32 * 4;  // fp32 tiles: the most column blocks of any dtype

int64_t factored_numel(const std::vector<int64_t>& shape) {
  const int64_t n = shape.back(), m = shape[shape.size() - 2];
  int64_t S = 1;
  for (size_t i = 0; i + 2 < shape.size(); ++i) S *= shape[i];
  // fp32 (the most column blocks); a peeled grid has at most 3 columns more
  return carve(make_geom(S, m, n, kMinTC, 3), Carver(), nullptr);
}

// The flat layout of `tensors` tensors of `tiles` tiles in all: headers (4 each; the single op's is
// the public one at ws[0..4)), grad_sq slots, partials (4 per tile); tickets at the back.
struct FlatLayout {
  int* call_ticket;
  float* gsq_slots;
  float* headers;
  int* tickets;
  float* parts;
};

int64_t flat_carve(int64_t tensors, int64_t tiles, Carver c, FlatLayout* L) {
  FlatLayout l;
  l.headers = c.data(kHeader * tensors);
  l.gsq_slots = c.data(tensors);
  l.parts = c.data(4 * tiles);
  l.call_ticket = c.tickets(1);
  l.tickets = c.tickets(tensors);
  if (L) *L = l;
  return c.need();
}

int64_t flat_tiles_max(int64_t numel) { return ceil_div(numel, flat_tile<float>()); }

struct Dispatch {
  bool sr, div;
};

template <typename Fn>
void with_format(at::ScalarType dtype, Dispatch d, const char* op, Fn&& fn) {
  auto go = [&](auto f_tag) {
    constexpr Fmt F = decltype(f_tag)::value;
    auto div = [&](auto sr_tag) {
      if (d.div) fn(f_tag, sr_tag, std::true_type{});
      else fn(f_tag, sr_tag, std::false_type{});
    };
    if constexpr (F != Fmt::F32) {  // fp32 stores are exact: no stochastic variant
      if (d.sr) return div(std::true_type{});
    }
    div(std::false_type{});
  };
  switch (dtype) {
    case at::kFloat: go(std::integral_constant<Fmt, Fmt::F32>{}); break;
    case at::kHalf: go(std::integral_constant<Fmt, Fmt::F16>{}); break;
    case at::kBFloat16: go(std::integral_constant<Fmt, Fmt::BF16>{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

void check_scalar_out(const char* op, const char* name, const std::optional<at::Tensor>& t,
                      const at::Tensor& like) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == like.device(),
              op, ": ", name, " must be a 1-element float32 tensor on ", like.device());
}

// The caller's workspace (checked), or a zeroed scratch of `need` floats for this call only.
at::Tensor workspace_or_scratch(const char* op, const std::optional<at::Tensor>& workspace,
                                int64_t need, const at::Tensor& like) {
  if (workspace.has_value()) {
    const at::Tensor& w = *workspace;
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.is_contiguous() &&
                    w.device() == like.device(),
                op, ": workspace must be a contiguous 1-d float32 tensor on ", like.device());
    TORCH_CHECK(w.numel() >= need, op, ": workspace has ", w.numel(), " elements, needs ", need,
                " (ops.workspace_numel)");
    return w;
  }
  return at::zeros({std::max<int64_t>(need, 1)}, like.options().dtype(at::kFloat));
}

// Launches the flat kernel over `ts` (one dtype) in chunks of kMaxMulti records.
void launch_flat(std::vector<FlatTensor>& ts, FlatCall call, at::ScalarType dtype, Dispatch d) {
  const Stream stream = current_stream();
  for (size_t b = 0; b < ts.size(); b += kMaxMulti) {
    FlatCall c = call;
    const int tiles = fill_records(c, ts, b, kMaxMulti);
    with_format(dtype, d, "adalomo_update_", [&](auto f_tag, auto sr_tag, auto div_tag) {
      constexpr Fmt F = decltype(f_tag)::value;
      constexpr bool SR = decltype(sr_tag)::value, DIV = decltype(div_tag)::value;
      LOMO_LAUNCH(adalomo_flat_kernel<F, SR, DIV>, tiles, kThreads, 0, stream, c);
    });
  }
}

FlatTensor flat_record(const at::Tensor& p, const at::Tensor& g, const at::Tensor& v,
                       const AdaLomoScalars& s, double gnumel, int index, int part, float* header,
                       int* ticket) {
  const int64_t n = p.numel();
  const int64_t tile = p.element_size() == 4 ? flat_tile<float>() : flat_tile<uint16_t>();
  FlatTensor t{};
  t.p = p.data_ptr();
  t.g = g.data_ptr();
  t.v = v.data_ptr<float>();
  t.n = n;
  t.gnumel = gnumel;
  t.s = s;
  t.tiles = static_cast<int32_t>(ceil_div(n, tile));
  t.index = index;
  t.part = part;
  t.header = header;
  t.ticket = ticket;
  t.vec = aligned16(t.p) && aligned16(t.g) && aligned16(t.v);
  return t;
}

template <Fmt F, bool SR, bool DIV>
void run_factored(const Args& a, int stage) {
  const Stream stream = current_stream();
  const int64_t T = a.geo.T;
  if (T == 0) {  // an empty local shard (stages only)
    LOMO_LAUNCH(empty_shard_kernel, 1, kThreads, 0, stream, a, stage);
    return;
  }
  if (stage == 0 || stage == 1) LOMO_LAUNCH(stats_kernel<F, DIV>, T, kThreads, 0, stream, a);
  if (stage == 0 || stage == 2) LOMO_LAUNCH(unorm_kernel<F, DIV>, T, kThreads, 0, stream, a);
  if (stage == 0 || stage == 3) LOMO_LAUNCH(apply_kernel<F, SR, DIV>, T, kThreads, 0, stream, a);
}

}  // namespace

int64_t lomo_workspace_numel(bool multi, const Shapes& shapes);  // lomo_update.cu
int64_t grad_accumulate_workspace_numel(const Shapes& shapes);   // grad_accumulate.cu

int64_t workspace_numel(std::string_view op, const Shapes& shapes) {
  int64_t need = 0;
  if (op == "adalomo_update_") {
    for (const auto& s : shapes) {
      int64_t numel = 1;
      for (int64_t d : s) numel *= d;
      need = std::max(need, s.size() >= 2 ? factored_numel(s)
                                          : flat_carve(1, flat_tiles_max(numel), Carver(), nullptr));
    }
  } else if (op == "adalomo_update_multi_") {
    int64_t tiles = 0;
    for (const auto& s : shapes) {
      int64_t numel = 1;
      for (int64_t d : s) numel *= d;
      tiles += flat_tiles_max(numel);
    }
    need = flat_carve(static_cast<int64_t>(shapes.size()), tiles, Carver(), nullptr);
  } else if (op == "lomo_update_" || op == "lomo_update_multi_") {
    need = lomo_workspace_numel(op == "lomo_update_multi_", shapes);
  } else if (op == "grad_accumulate_") {
    need = grad_accumulate_workspace_numel(shapes);
  }
  return need;
}

void adalomo_update(ADALOMO_UPDATE_PARAMS) {
  constexpr const char* op = "adalomo_update_";
  check_common(op, param, grad, clip_coef, found_inf);
  LOMO_CHECK_DEVICE(op, param);
  check_adalomo_state(param, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq);
  check_scalar_out(op, "grad_sq", grad_sq, param);
  const bool sr = parse_rounding(op, rounding);
  TORCH_CHECK(stage >= 0 && stage <= 3, op, ": stage must be 0 (all passes) or 1, 2, 3, got ",
              stage);
  TORCH_CHECK(stage == 0 || workspace.has_value(), op, ": stage ", stage,
              " needs a workspace (ops.workspace_numel)");
  const int64_t numel = param.numel();
  if (numel == 0 && stage == 0) return;
  const DeviceGuard guard(param.device());
  const Preprocess pre = make_preprocess(loss_scale, clip_grad_value);
  const AdaLomoScalars s =
      make_adalomo_scalars(pre, lr, weight_decay, beta, eps1, eps2, clip_threshold, seed, step);
  const Dispatch d{sr, pre.divide};
  const double gnumel = static_cast<double>(global_numel > 0 ? global_numel : numel);

  if (param.dim() >= 2) {
    Args a{};
    a.p = param.data_ptr();
    a.g = grad.data_ptr();
    a.row_state = exp_avg_sq_row->data_ptr<float>();
    a.col_state = exp_avg_sq_col->data_ptr<float>();
    a.clip_coef = float_ptr(clip_coef);
    a.found_inf = float_ptr(found_inf);
    a.grad_sq = float_ptr(grad_sq);
    a.s = s;
    const int64_t n = param.size(-1), m = param.size(-2);
    const int64_t S = m * n > 0 ? numel / (m * n) : [&] {
      int64_t prod = 1;
      for (int64_t i = 0; i + 2 < param.dim(); ++i) prod *= param.size(i);
      return prod;
    }();
    const int64_t N = 16 / param.element_size(), size = param.element_size();
    const auto pa = reinterpret_cast<uintptr_t>(a.p), ga = reinterpret_cast<uintptr_t>(a.g);
    a.vec = n % N == 0 && pa % 16 == ga % 16 && pa % size == 0;
    const int64_t head = a.vec ? static_cast<int64_t>((16 - pa % 16) % 16) / size : 0;
    a.shift = static_cast<int>((N - head) % N);
    a.geo = make_geom(S, m, n, 32 * N, a.shift);
    TORCH_CHECK(a.geo.T < (int64_t{1} << 31) && a.geo.nrb * a.geo.ncb < (int64_t{1} << 30), op,
                ": tensor too large (", a.geo.T, " tiles)");
    at::Tensor ws = workspace_or_scratch(op, workspace, carve(a.geo, Carver(), nullptr), param);
    carve(a.geo, Carver(ws.data_ptr<float>(), ws.numel()), &a.ws);
    a.global_rows = static_cast<float>(global_rows > 0 ? global_rows : m);
    a.global_numel = gnumel;
    with_format(param.scalar_type(), d, op, [&](auto f_tag, auto sr_tag, auto div_tag) {
      run_factored<decltype(f_tag)::value, decltype(sr_tag)::value, decltype(div_tag)::value>(
          a, static_cast<int>(stage));
    });
    return;
  }

  // unfactored: the flat kernel with one record; its header is the public one at ws[0..4)
  const int64_t tiles = ceil_div(numel, param.element_size() == 4 ? flat_tile<float>()
                                                                  : flat_tile<uint16_t>());
  at::Tensor ws =
      workspace_or_scratch(op, workspace, flat_carve(1, tiles, Carver(), nullptr), param);
  FlatLayout L;
  flat_carve(1, tiles, Carver(ws.data_ptr<float>(), ws.numel()), &L);
  FlatCall call{};
  call.clip_coef = float_ptr(clip_coef);
  call.found_inf = float_ptr(found_inf);
  call.grad_sq = float_ptr(grad_sq);
  call.parts = L.parts;
  call.total_tiles = static_cast<int>(tiles);
  call.gsq_slots = L.gsq_slots;
  call.call_ticket = L.call_ticket;
  call.call_tensors = 1;
  std::vector<FlatTensor> ts{
      flat_record(param, grad, *exp_avg_sq, s, gnumel, 0, 0, L.headers, L.tickets)};
  if (numel == 0) {  // an empty local shard: zero header (stage 1), found_inf (stage 3)
    Args a{};
    a.found_inf = call.found_inf;
    a.ws.header = L.headers;
    if (stage != 2)
      LOMO_LAUNCH(empty_shard_kernel, 1, kThreads, 0, current_stream(), a, static_cast<int>(stage));
    return;
  }
  if (stage == 2) return;  // sum(u*u) is in the header since stage 1
  if (stage == 0 && tiles <= kFuseTiles) {
    call.mode = kFlatFused;
    launch_flat(ts, call, param.scalar_type(), d);
    return;
  }
  if (stage != 3) {
    call.mode = kFlatStats;
    launch_flat(ts, call, param.scalar_type(), d);
  }
  if (stage != 1) {
    call.mode = kFlatApply;
    launch_flat(ts, call, param.scalar_type(), d);
  }
}

void adalomo_update_multi(ADALOMO_UPDATE_MULTI_PARAMS) {
  constexpr const char* op = "adalomo_update_multi_";
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && exp_avg_sqs.size() == k, op, ": ", k, " params but ",
              grads.size(), " grads and ", exp_avg_sqs.size(), " exp_avg_sqs");
  for (const auto* list : {&lr, &weight_decay, &clip_grad_value, &beta, &eps1, &eps2,
                           &clip_threshold})
    TORCH_CHECK(list->size() == k, op, ": every per-tensor scalar list needs ", k, " values");
  TORCH_CHECK(seed.size() == k && step.size() == k, op, ": seed and step need ", k, " values");
  const bool sr = parse_rounding(op, rounding);
  std::vector<size_t> live;
  int64_t tiles = 0;
  for (size_t i = 0; i < k; ++i) {
    check_common(op, params[i], grads[i], clip_coef, found_inf);
    LOMO_CHECK_DEVICE(op, params[i]);
    TORCH_CHECK(params[i].dim() <= 1, op, ": takes 0-d and 1-d tensors only, got shape ",
                params[i].sizes());
    TORCH_CHECK(params[i].device() == params[0].device(), op,
                ": every tensor must be on one device");
    const at::Tensor& v = exp_avg_sqs[i];
    TORCH_CHECK(v.scalar_type() == at::kFloat && v.numel() == params[i].numel() &&
                    v.is_contiguous() && v.device() == params[i].device(),
                op, ": exp_avg_sqs[", i, "] must be a contiguous float32 tensor of ",
                params[i].numel(), " elements on ", params[i].device());
    check_scalar_out(op, "grad_sq", grad_sq, params[i]);
    if (params[i].numel() > 0) {
      live.push_back(i);
      tiles += ceil_div(params[i].numel(), params[i].element_size() == 4 ? flat_tile<float>()
                                                                         : flat_tile<uint16_t>());
    }
  }
  if (live.empty()) return;
  const at::Tensor& first = params[live[0]];
  const DeviceGuard guard(first.device());
  const Preprocess pre = make_preprocess(loss_scale, 0.0);
  const int64_t count = static_cast<int64_t>(live.size());
  at::Tensor ws =
      workspace_or_scratch(op, workspace, flat_carve(count, tiles, Carver(), nullptr), first);
  FlatLayout L;
  flat_carve(count, tiles, Carver(ws.data_ptr<float>(), ws.numel()), &L);
  FlatCall call{};
  call.clip_coef = float_ptr(clip_coef);
  call.found_inf = float_ptr(found_inf);
  call.grad_sq = float_ptr(grad_sq);
  call.parts = L.parts;
  call.total_tiles = static_cast<int>(tiles);
  call.gsq_slots = L.gsq_slots;
  call.call_ticket = L.call_ticket;
  call.call_tensors = static_cast<int>(count);
  call.mode = kFlatFused;
  // one launch per dtype (per kMaxMulti tensors), in order of first appearance
  std::vector<at::ScalarType> dtypes;
  for (size_t i : live)
    if (std::find(dtypes.begin(), dtypes.end(), params[i].scalar_type()) == dtypes.end())
      dtypes.push_back(params[i].scalar_type());
  int part = 0;
  std::vector<std::vector<FlatTensor>> groups(dtypes.size());
  for (int j = 0; j < count; ++j) {
    const size_t i = live[j];
    const Preprocess pi = make_preprocess(loss_scale, clip_grad_value[i]);
    const AdaLomoScalars s = make_adalomo_scalars(pi, lr[i], weight_decay[i], beta[i], eps1[i],
                                                  eps2[i], clip_threshold[i], seed[i], step[i]);
    FlatTensor t = flat_record(params[i], grads[i], exp_avg_sqs[i], s,
                               static_cast<double>(params[i].numel()), j, part,
                               L.headers + kHeader * j, L.tickets + j);
    part += t.tiles;
    const size_t gi = std::find(dtypes.begin(), dtypes.end(), params[i].scalar_type()) -
                      dtypes.begin();
    groups[gi].push_back(t);
  }
  for (size_t gi = 0; gi < dtypes.size(); ++gi)
    launch_flat(groups[gi], call, dtypes[gi], Dispatch{sr, pre.divide});
}

}  // namespace LOMO_CUDA_NS
}  // namespace lomo
