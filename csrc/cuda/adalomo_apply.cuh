// AdaLomo pass 3 on a factored parameter (apply_kernel, adalomo_update.cu): the update, the
// rounding and the commit of the state; and the stages of a rank whose shard is empty.
#pragma once

#include "cuda/adalomo_tiles.cuh"

namespace lomo {
namespace LOMO_CUDA_NS {
namespace {

template <Fmt F, Fmt GF, bool SR, bool DIV, bool DIVIDE_U>
__device__ __forceinline__ void apply_rows(const Args& a, const TilePos& t, const float* cf,
                                           float mean_r, float coef, float lr_t, float decay,
                                           float denom) {
  using S = storage_t<F>;
  using SG = storage_t<GF>;  // the gradient: S, or float32 (an accumulation buffer)
  constexpr int N = Pack<S>::N;
  const Geom& geo = a.geo;
  S* p = static_cast<S*>(a.p);
  const SG* g = static_cast<const SG*>(a.g);
  const bool active = t.c0 + N > 0 && t.c0 < geo.n;
  const bool full = a.vec && t.c0 >= 0 && t.c0 + N <= geo.n;
  for (int64_t r = t.r0 + t.warp; r - t.warp < t.rend; r += kWarps * kApplyUnroll) {
    GradPack<SG, S> gv[kApplyUnroll];
    Pack<S> pv[kApplyUnroll];
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
            clip_scale(unscale<DIV>(to_f32<GF>(gv[u].v[k]), a.s.scale), a.s.clip, coef);
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
template <Fmt F, Fmt GF, bool SR, bool DIV>
__global__ void __launch_bounds__(kThreads, DIV ? 3 : 4) apply_kernel(const Args a) {
  LOMO_BOUNDS(kThreads);
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
    apply_rows<F, GF, SR, DIV, false>(a, t, cf, mean_r, coef, lr_t, decay, denom);
  else
    apply_rows<F, GF, SR, DIV, true>(a, t, cf, mean_r, coef, lr_t, decay, denom);
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
  LOMO_BOUNDS(kThreads);
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

}  // namespace
}  // namespace LOMO_CUDA_NS
}  // namespace lomo
