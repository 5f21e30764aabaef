// AdaLomo pass 2 on a factored parameter (unorm_kernel, adalomo_update.cu): c' from the header
// (kept in the workspace) and sum(u*u), finished by a ticket (reduce.cuh).
#pragma once

#include "cuda/adalomo_tiles.cuh"

namespace lomo {
namespace LOMO_CUDA_NS {
namespace {

template <Fmt F, Fmt GF, bool DIV>
__global__ void __launch_bounds__(kThreads, 3) unorm_kernel(const Args a) {
  LOMO_BOUNDS(kThreads);
  using S = storage_t<F>;
  using SG = storage_t<GF>;  // the gradient: S, or float32 (an accumulation buffer)
  constexpr int N = Pack<S>::N;
  constexpr int TC = 32 * N;
  LOMO_SHARED(float, red, [32]);
  LOMO_SHARED(double, dred, [32]);
  LOMO_SHARED(int, flag);
  if (__ldcg(a.ws.header + 1) > 0.0f) return;  // the same in every block: no ticket taken
  const Geom& geo = a.geo;
  const TilePos t = tile_pos<TC, N>(a);
  const SG* g = static_cast<const SG*>(a.g);
  const bool active = t.c0 + N > 0 && t.c0 < geo.n;
  const bool full = a.vec && t.c0 >= 0 && t.c0 + N <= geo.n;
  const float coef = a.clip_coef ? *a.clip_coef : 1.0f;
  float cf[N];
  const float mean_r = factors<N, true>(a, t, cf);
  float uu = 0.0f;
  for (int64_t r = t.r0 + t.warp; r - t.warp < t.rend; r += kRowStep) {
    GradPack<SG, S> gv[kRowUnroll];
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
        for (int k = 0; k < N; ++k) gv[u].v[k] = SG(0);
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
            clip_scale(unscale<DIV>(to_f32<GF>(gv[u].v[k]), a.s.scale), a.s.clip, coef);
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

}  // namespace
}  // namespace LOMO_CUDA_NS
}  // namespace lomo
