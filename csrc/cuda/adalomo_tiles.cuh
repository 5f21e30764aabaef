// The tiling of a factored parameter that AdaLomo's three passes share (adalomo_update.cu): the
// geometry of the tiles, the workspace layout, the kernel argument, a block's tile position, the
// column loads and the row/column factors of passes 2 and 3. Included by adalomo_update.cu only.
#pragma once

#include <algorithm>

#include "cuda/adalomo_flat.cuh"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"
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
  // 16-byte packs: n % N == 0 and p, g in the same 16-byte phase (vec.cuh's same_phase; N: p's
  // elements per pack, a float32 g moves them as two packs). Every row then starts
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

// The N columns from c0 of one row (`row` points at its column 0), into a Pack<S> (or the Packs
// of a float32 gradient of a 16-bit parameter). (Kept as a Pack: 16-bit values stay two to a
// register.)
template <typename S, class PK>
__device__ __forceinline__ void load_cols(const S* row, PK& dst, int64_t c0, int64_t n,
                                          bool full) {
  constexpr int N = sizeof(PK::v) / sizeof(S);
  if (full) {
    load_into(dst, row + c0);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) dst.v[k] = valid_col(c0 + k, n) ? row[c0 + k] : S(0);
  }
}

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

}  // namespace
}  // namespace LOMO_CUDA_NS
}  // namespace lomo
