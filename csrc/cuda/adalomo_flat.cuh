// AdaLomo on unfactored (0-d / 1-d) parameters, single and multi-tensor (docs/spec.md), included
// by adalomo_update.cu.
//
// A tensor is cut into tiles of kFlatTile packs per thread (one block each). v' = beta*v +
// (1-beta)*G is known from g alone, so ONE pass yields every statistic: sum(p*p), sum(u*u) with
// u = g*rsqrt(v'), the bad flag and the grad_sq contribution, as per-tile partials. The tile that
// arrives last (integer ticket) sums the partials in tile order (double) into the tensor's header
// [sum_pp, bad, sum_uu]; the apply then recomputes v' and u (v' is committed only there).
//
//   small tensors (<= kFuseTiles tiles) and every multi-tensor call: ONE launch; the last tile of a
//     tensor applies all its tiles itself, right after the header is complete;
//   larger tensors: stats launch + apply launch (2).
// The single op on a small tensor is the multi kernel with one record, so both are bitwise equal.
// grad_sq: each tensor's sum goes to a slot; the last tensor of the call (a second ticket) adds the
// slots to grad_sq in list order: exactly the float adds of single ops called in that order.
#pragma once

#include "cuda/reduce.cuh"

namespace lomo {
namespace LOMO_CUDA_NS {
namespace {

constexpr int kFlatUnroll = 2;   // packs per thread per tile, loads issued first
constexpr int kFuseTiles = 8;    // a tensor of at most this many tiles is applied by its last tile
constexpr int kMaxMulti = 16;    // tensors per multi-tensor launch (kernel parameter space)

template <typename S>
__host__ __device__ constexpr int64_t flat_tile() {  // host (grid sizes) and device (tile offsets)
  return int64_t{kThreads} * Pack<S>::N * kFlatUnroll;
}

// One tensor of a (multi-)tensor launch.
struct FlatTensor {
  void* p;
  const void* g;
  float* v;
  int64_t n;
  double gnumel;    // numel that rms divides by (the unsharded one for a sharded parameter)
  AdaLomoScalars s;
  int32_t first;    // first tile of this tensor in the launch's grid
  int32_t tiles;
  int32_t index;    // position in the call's tensor list (grad_sq order)
  int32_t part;     // its partial slots: parts + 4 * part .. (pp, uu, gsq, bad) per tile
  float* header;    // [sum_pp, bad, sum_uu, -]
  int* ticket;      // tiles of this tensor done
  bool vec;         // p, g and v 16-byte aligned
};

struct FlatCall {
  FlatTensor t[kMaxMulti];
  int count;
  const float* clip_coef;
  float* found_inf;
  float* grad_sq;
  float* parts;       // [4][tiles of the call]
  int total_tiles;
  float* gsq_slots;   // [tensors of the call]
  int* call_ticket;   // tensors of the call done (list-order grad_sq)
  int call_tensors;   // tensors of the whole call (all launches)
  int mode;           // kFlatStats, kFlatFused, kFlatApply
};

enum FlatMode { kFlatStats, kFlatFused, kFlatApply };

// The preprocessed gradient pieces of one element: the unscaled value (grad_sq) and the clipped one.
template <bool DIV>
__device__ __forceinline__ float unscale(float g, float scale) {
  return DIV ? g / scale : g * scale;
}
__device__ __forceinline__ float clip_scale(float g, float clip, float coef) {
  g = g < -clip ? -clip : g;
  g = g > clip ? clip : g;
  return g * coef;
}

// The elements of a Pack<S> (or of the Packs of a float32 gradient of a 16-bit parameter) from e.
template <typename S, class PK>
__device__ __forceinline__ void load_flat(const S* src, PK& dst, int64_t e, int64_t n,
                                          bool full) {
  constexpr int N = sizeof(PK::v) / sizeof(S);
  if (full) {
    load_into(dst, src + e);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) dst.v[k] = e + k < n ? src[e + k] : S(0);
  }
}
__device__ __forceinline__ void load_v(const float* v, float* dst, int64_t e, int64_t n,
                                       bool full) {
  if (full) {
    const Pack<float> x = load_pack(v + e);
#pragma unroll
    for (int k = 0; k < 4; ++k) dst[k] = x.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) dst[k] = e + k < n ? v[e + k] : 0.0f;
  }
}

// The loads of one tile, all issued before any use: g (GradPack), p (Pack<S>) and v (fp32) of
// kFlatUnroll packs per thread; packs past n are left unloaded (callers skip them).
template <typename S, typename SG>
__device__ __forceinline__ void load_flat_tile(const FlatTensor& t, const SG* g, const S* p,
                                               int64_t t0, GradPack<SG, S> (&gv)[kFlatUnroll],
                                               Pack<S> (&pv)[kFlatUnroll],
                                               float (&vv)[kFlatUnroll][Pack<S>::N]) {
  constexpr int N = Pack<S>::N;
  const int64_t n = t.n;
#pragma unroll
  for (int u = 0; u < kFlatUnroll; ++u) {
    const int64_t e = t0 + (static_cast<int64_t>(u) * kThreads + fresh_thread_index()) * N;
    const bool full = t.vec && e + N <= n;
    if (e < n) {
      load_flat(g, gv[u], e, n, full);
      load_flat(p, pv[u], e, n, full);
#pragma unroll
      for (int q = 0; q < N; q += 4) load_v(t.v, vv[u] + q, e + q, n, full);
    }
  }
}

// v' and u of one element (reference: torch.add(v*beta, G, alpha=1-beta), u = rsqrt(v') * g).
__device__ __forceinline__ float flat_u(const AdaLomoScalars& s, float gp, float v, float& vn) {
  const float G = __fadd_rn(__fmul_rn(gp, gp), s.eps1);
  vn = __fmaf_rn(G, s.one_minus_beta, __fmul_rn(v, s.beta));
  return __fmul_rn(1.0f / sqrtf(vn), gp);
}

// Pass 1 of one tile: its partials (pp, uu, gsq, bad) into the call's slots.
template <Fmt F, Fmt GF, bool DIV>
__device__ void flat_stats_tile(const FlatCall& c, const FlatTensor& t, int tile, float coef,
                                float* red) {
  using S = storage_t<F>;
  using SG = storage_t<GF>;  // the gradient: S, or float32 (an accumulation buffer)
  constexpr int N = Pack<S>::N;
  const S* p = static_cast<const S*>(t.p);
  const SG* g = static_cast<const SG*>(t.g);
  const int64_t n = t.n, t0 = tile * flat_tile<S>();
  float pp = 0.0f, uu = 0.0f, gsq = 0.0f;
  bool bad = false;
  GradPack<SG, S> gv[kFlatUnroll];
  Pack<S> pv[kFlatUnroll];
  float vv[kFlatUnroll][N];
  load_flat_tile<S, SG>(t, g, p, t0, gv, pv, vv);  // every load first
#pragma unroll
  for (int u = 0; u < kFlatUnroll; ++u) {
    const int64_t e = t0 + (static_cast<int64_t>(u) * kThreads + fresh_thread_index()) * N;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (e + k < n) {
        const float graw = to_f32<GF>(gv[u].v[k]);
        bad |= !is_finite_f32(graw);
        const float gu = unscale<DIV>(graw, t.s.scale);
        gsq += gu * gu;
        float vn;
        const float uval = flat_u(t.s, clip_scale(gu, t.s.clip, coef), vv[u][k], vn);
        uu += uval * uval;
        const float pf = to_f32<F>(pv[u].v[k]);
        pp += pf * pf;
      }
    }
  }
  const int slot = t.part + tile;
  pp = block_sum<kThreads>(pp, red);
  uu = block_sum<kThreads>(uu, red);
  gsq = block_sum<kThreads>(gsq, red);
  bad = __syncthreads_or(bad) != 0;
  if (fresh_thread_index() == 0) {
    c.parts[slot] = pp;
    c.parts[c.total_tiles + slot] = uu;
    c.parts[2 * c.total_tiles + slot] = gsq;
    c.parts[3 * c.total_tiles + slot] = bad ? 1.0f : 0.0f;
  }
}

// Pass 3 of one tile (the header is complete and finite).
template <Fmt F, Fmt GF, bool SR, bool DIV, bool DIVIDE_U>
__device__ void flat_apply_tile(const FlatTensor& t, int tile, float coef, float lr_t, float decay,
                                float denom) {
  using S = storage_t<F>;
  using SG = storage_t<GF>;
  constexpr int N = Pack<S>::N;
  S* p = static_cast<S*>(t.p);
  const SG* g = static_cast<const SG*>(t.g);
  const int64_t n = t.n, t0 = tile * flat_tile<S>();
  GradPack<SG, S> gv[kFlatUnroll];
  Pack<S> pv[kFlatUnroll];
  float vv[kFlatUnroll][N];
  load_flat_tile<S, SG>(t, g, p, t0, gv, pv, vv);  // every load first
#pragma unroll
  for (int u = 0; u < kFlatUnroll; ++u) {
    const int64_t e = t0 + (static_cast<int64_t>(u) * kThreads + fresh_thread_index()) * N;
    if (e >= n) continue;
    const bool full = t.vec && e + N <= n;
    // packs start at multiples of N: never across a multiple of 2**32
    const uint32_t hk = SR ? hash_high_key(t.s.key, e) : 0u;
    float vn[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float gp = clip_scale(unscale<DIV>(to_f32<GF>(gv[u].v[k]), t.s.scale), t.s.clip, coef);
      float uval = flat_u(t.s, gp, vv[u][k], vn[k]);
      if (DIVIDE_U) uval = __fdiv_rn(uval, denom);
      const float nv = __fsub_rn(__fmul_rn(to_f32<F>(pv[u].v[k]), decay), __fmul_rn(lr_t, uval));
      pv[u].v[k] = from_f32<F, SR>(nv, SR ? mix32(static_cast<uint32_t>(e + k) ^ hk) : 0u);
    }
    if (full) {
      store_pack(p + e, pv[u]);
#pragma unroll
      for (int q = 0; q < N; q += 4) {
        Pack<float> vo;
#pragma unroll
        for (int k = 0; k < 4; ++k) vo.v[k] = vn[q + k];
        store_pack(t.v + e + q, vo);
      }
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (e + k < n) {
          p[e + k] = pv[u].v[k];
          t.v[e + k] = vn[k];
        }
      }
    }
  }
}

__device__ __forceinline__ float rms_of(float sum_sq, double numel) {
  return static_cast<float>(sqrt(static_cast<double>(sum_sq) / numel));
}

// Every tile of tensor `t` from `first` on, `step` apart; nothing when the header says non-finite.
template <Fmt F, Fmt GF, bool SR, bool DIV>
__device__ void flat_apply_tiles(const FlatCall& c, const FlatTensor& t, int first, int step,
                                 float coef) {
  const float* h = t.header;
  if (__ldcg(h + 1) > 0.0f) {
    if (first == 0 && fresh_thread_index() == 0 && c.found_inf) *c.found_inf = 1.0f;
    return;
  }
  const float lr_t = adalomo_lr_t(t.s, rms_of(__ldcg(h + 0), t.gnumel));
  const float decay = adalomo_decay(t.s, lr_t);
  const float denom = adalomo_denom(t.s, rms_of(__ldcg(h + 2), t.gnumel));
  for (int tile = first; tile < t.tiles; tile += step) {
    if (denom == 1.0f)  // u / 1 == u exactly: no division per element
      flat_apply_tile<F, GF, SR, DIV, false>(t, tile, coef, lr_t, decay, denom);
    else
      flat_apply_tile<F, GF, SR, DIV, true>(t, tile, coef, lr_t, decay, denom);
  }
}

// The last tile of a tensor: the header from the partials in tile order, the tensor's grad_sq
// (list order across the call), and (fused) the apply of every tile of the tensor.
template <Fmt F, Fmt GF, bool SR, bool DIV>
__device__ void flat_finish(const FlatCall& c, const FlatTensor& t, float coef, double* dred,
                            int* flag) {
  const float* parts = c.parts + t.part;
  const double pp = sum_in_order(parts, t.tiles, dred);
  const double uu = sum_in_order(parts + c.total_tiles, t.tiles, dred);
  const double gsq = sum_in_order(parts + 2 * c.total_tiles, t.tiles, dred);
  const bool bad = any_in(parts + 3 * c.total_tiles, t.tiles);
  if (fresh_thread_index() == 0) {
    t.header[0] = static_cast<float>(pp);
    t.header[1] = bad ? 1.0f : 0.0f;
    t.header[2] = static_cast<float>(uu);
    c.gsq_slots[t.index] = static_cast<float>(gsq);
  }
  if (c.grad_sq && last_arrival(c.call_ticket, c.call_tensors, flag) &&
      fresh_thread_index() == 0) {
    float acc = *c.grad_sq;
    for (int i = 0; i < c.call_tensors; ++i) acc += __ldcg(c.gsq_slots + i);
    *c.grad_sq = acc;
  }
  if (c.mode == kFlatFused) {
    __threadfence();
    __syncthreads();
    flat_apply_tiles<F, GF, SR, DIV>(c, t, 0, 1, coef);
  }
}

// The one flat kernel: block b is tile (b - first) of the record whose range holds b.
template <Fmt F, Fmt GF, bool SR, bool DIV>
__global__ void __launch_bounds__(kThreads, 3) adalomo_flat_kernel(const __grid_constant__ FlatCall c) {
  LOMO_BOUNDS(kThreads);
  LOMO_SHARED(float, red, [32]);
  LOMO_SHARED(double, dred, [32]);
  LOMO_SHARED(int, flag);
  int i = 0;
  while (i + 1 < c.count && static_cast<int>(blockIdx.x) >= c.t[i + 1].first) ++i;
  const FlatTensor& t = c.t[i];
  const int tile = static_cast<int>(blockIdx.x) - t.first;
  const float coef = c.clip_coef ? *c.clip_coef : 1.0f;
  if (c.mode == kFlatApply) {
    flat_apply_tiles<F, GF, SR, DIV>(c, t, tile, t.tiles, coef);  // this tile only
    return;
  }
  flat_stats_tile<F, GF, DIV>(c, t, tile, coef, red);
  if (last_arrival(t.ticket, t.tiles, &flag)) flat_finish<F, GF, SR, DIV>(c, t, coef, dred, &flag);
}

}  // namespace
}  // namespace LOMO_CUDA_NS
}  // namespace lomo
