// AdaLomo pass 1 on a factored parameter (stats_kernel, adalomo_update.cu): the row and column
// sums of G, sum(p*p), sum(g_unscaled^2) and the bad flag, finished by tickets (reduce.cuh).
#pragma once

#include "cuda/adalomo_tiles.cuh"

namespace lomo {
namespace LOMO_CUDA_NS {
namespace {

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

template <Fmt F, Fmt GF, bool DIV>
__global__ void __launch_bounds__(kThreads, 3) stats_kernel(const Args a) {
  LOMO_BOUNDS(kThreads);
  using S = storage_t<F>;
  using SG = storage_t<GF>;  // the gradient: S, or float32 (an accumulation buffer)
  constexpr int N = Pack<S>::N;
  constexpr int TC = 32 * N;
  LOMO_SHARED(float, col_smem, [kWarps * TC]);
  LOMO_SHARED(float, red, [32]);
  LOMO_SHARED(double, dred, [32]);
  LOMO_SHARED(int, flag);
  const Geom& geo = a.geo;
  const TilePos t = tile_pos<TC, N>(a);
  const S* p = static_cast<const S*>(a.p);
  const SG* g = static_cast<const SG*>(a.g);
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
    GradPack<SG, S> gv[kStatsUnroll];
    Pack<S> pv[kStatsUnroll];
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {  // every load of the step first
      const int64_t ru = r + u * kWarps;
      if (ru < t.rend && active) {
        const int64_t row0 = (t.slice * geo.m + ru) * geo.n;
        load_cols(g + row0, gv[u], t.c0, geo.n, full);
        load_cols(p + row0, pv[u], t.c0, geo.n, full);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
          gv[u].v[k] = SG(0);
          pv[u].v[k] = S(0);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      const int64_t ru = r + u * kWarps;
      float rowsum = 0.0f;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (ru < t.rend && valid_col(t.c0 + k, geo.n)) {
          const float graw = to_f32<GF>(gv[u].v[k]);
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

}  // namespace
}  // namespace LOMO_CUDA_NS
}  // namespace lomo
