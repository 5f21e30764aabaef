// AdaLomo on CUDA (SPEC.md): three passes over g, one write of p, no host synchronisation.
//
// Factored (dim >= 2, batched over leading dims): the tensor is cut into tiles of kTileRows rows
// x (32 lanes * N) columns inside one [m, n] slice; lane l of a warp owns N consecutive columns
// (one 16-byte load) and the warp walks rows.
//   pass 1  tile_kernel<kStats>: G = g*g + eps1 row sums (warp butterfly) and column sums (over the
//           tile's rows, warps added in order via shared memory) to per-tile slots; sum(p*p) per
//           tile; a non-finite flag (plain store of 1);
//   state_kernel: row/column slots summed in a fixed order (double) -> new r, c, written only
//           when the flag is clear; finalize_kernel (one block): mean(r) per slice, lr_t, decay;
//   pass 2  tile_kernel<kUnorm>: sum(u*u) per tile; finalize: denom = max(1, rms(u)/threshold);
//   pass 3  tile_kernel<kApply>: u / denom, p = p*decay - lr_t*u, round, store.
// Unfactored (0-d / 1-d): the same three passes over flat 16-byte packs.
//
// Cost: pass 1 reads g and p, pass 2 reads g, pass 3 reads g and p and writes p (12 bytes per bf16
// element in all, the SPEC minimum). When g fits in L2 (50 MB on H100: up to ~25M bf16 elements,
// less what pass 1's p reads evict) pass 2's re-read of g, and part of pass 3's, hits L2 (several
// TB/s) instead of HBM, so passes 2 and 3 then cost about as much as LOMO's single pass; larger
// tensors pay the full 12 bytes from HBM. The small kernels between passes touch O(m + n) floats.
//
// Determinism: tile/block partials are written to scratch slots and reduced in index order by one
// thread or one block (no floating-point atomics); the partition depends only on the shape.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "cuda/vec.cuh"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace cuda {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 64;        // 8 rows per warp
constexpr int kFinalThreads = 1024;  // the one-block reductions
constexpr int kMaxFlatBlocks = 1024;

enum Pass { kStats, kUnorm, kApply };

// Device scratch of one call (see alloc_scratch).
struct Scratch {
  int* bad;        // 1: a gradient element is NaN/Inf
  float* scalars;  // lr_t, decay, denom
  float* meanr;    // [slices] mean of the new r over each slice
  float* rowpart;  // [ncb][rows] row sums of G per column block
  float* colpart;  // [slices * nrb][n] column sums of G per row block
  float* part;     // [tiles or blocks] sum(p*p) in pass 1, sum(u*u) in pass 2
};

struct Geom {
  int64_t slices, m, n, nrb, ncb;  // factored: slices of m x n, tiles nrb x ncb per slice
  int64_t numel;
};

template <typename S>
__device__ __forceinline__ void load_n(const S* src, S* dst, int64_t col, int64_t n, bool full_vec) {
  constexpr int N = Pack<S>::N;
  if (full_vec) {
    const Pack<S> x = load_pack(src);
#pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = x.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = col + k < n ? src[k] : S(0);
  }
}

// ---- factored passes -------------------------------------------------------------------------
template <Fmt F, bool SR, bool DIV, int PASS>
__global__ void __launch_bounds__(kThreads)
    tile_kernel(storage_t<F>* __restrict__ p, const storage_t<F>* __restrict__ g,
                const float* __restrict__ row_state, const float* __restrict__ col_state,
                AdaLomoScalars s, const float* __restrict__ clip_coef, Scratch sc, Geom geo,
                bool vec) {
  using S = storage_t<F>;
  constexpr int N = Pack<S>::N;
  constexpr int TC = 32 * N;
  __shared__ float col_smem[PASS == kStats ? kWarps * TC : 1];
  __shared__ float red_smem[32];
  if (PASS != kStats && *sc.bad) return;  // the same for every block

  const int64_t tile = blockIdx.x;
  const int64_t cb = tile % geo.ncb, srb = tile / geo.ncb;
  const int64_t slice = srb / geo.nrb, r0 = (srb % geo.nrb) * kTileRows;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c0 = cb * TC + lane * N;  // this lane's first column
  const bool full_vec = vec && c0 + N <= geo.n;
  const float coef = clip_coef ? *clip_coef : 1.0f;

  float cf[N];  // rsqrt(c) of this lane's columns
  float meanr = 1.0f, lr_t = 0.0f, decay = 1.0f, denom = 1.0f;
  if (PASS != kStats) {
#pragma unroll
    for (int k = 0; k < N; ++k)
      cf[k] = c0 + k < geo.n ? 1.0f / sqrtf(col_state[slice * geo.n + c0 + k]) : 0.0f;
    meanr = sc.meanr[slice];
    lr_t = sc.scalars[0];
    decay = sc.scalars[1];
    denom = sc.scalars[2];
  }

  float colacc[N];
#pragma unroll
  for (int k = 0; k < N; ++k) colacc[k] = 0.0f;
  float acc = 0.0f;
  bool bad = false;
  for (int rr = warp; rr < kTileRows; rr += kWarps) {
    const int64_t r = r0 + rr;
    if (r >= geo.m) break;  // warp-uniform
    const int64_t row = slice * geo.m + r;
    const int64_t base = row * geo.n + c0;
    S gv[N];
    if (c0 < geo.n) load_n(g + base, gv, c0, geo.n, full_vec);
    if (PASS == kStats) {
      S pv[N];
      if (c0 < geo.n) load_n(p + base, pv, c0, geo.n, full_vec);
      float rowsum = 0.0f;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (c0 + k < geo.n) {
          const float graw = to_f32<F>(gv[k]);
          bad |= !is_finite_f32(graw);
          const float gp = preprocess<DIV>(graw, s.scale, s.clip, coef);
          const float G = __fadd_rn(__fmul_rn(gp, gp), s.eps1);
          rowsum += G;
          colacc[k] += G;
          const float pf = to_f32<F>(pv[k]);
          acc += pf * pf;
        }
      }
      rowsum = warp_sum(rowsum);
      if (lane == 0) sc.rowpart[cb * geo.slices * geo.m + row] = rowsum;
    } else if (c0 < geo.n) {
      // rsqrt(r / mean(r)), with IEEE division and sqrt as torch's CPU reference
      const float rf = 1.0f / sqrtf(__fdiv_rn(row_state[row], meanr));
      if (PASS == kUnorm) {
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const float u = __fmul_rn(__fmul_rn(rf, cf[k]),
                                    preprocess<DIV>(to_f32<F>(gv[k]), s.scale, s.clip, coef));
          acc += c0 + k < geo.n ? u * u : 0.0f;
        }
      } else {
        S pv[N];
        load_n(p + base, pv, c0, geo.n, full_vec);
        // a full pack starts at a multiple of N (n % N == 0): it never crosses a multiple of 2**32
        const uint32_t hk = SR ? hash_high_key(s.key, base) : 0u;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const float gp = preprocess<DIV>(to_f32<F>(gv[k]), s.scale, s.clip, coef);
          const float u = __fdiv_rn(__fmul_rn(__fmul_rn(rf, cf[k]), gp), denom);
          const float nv = __fsub_rn(__fmul_rn(to_f32<F>(pv[k]), decay), __fmul_rn(lr_t, u));
          uint32_t bits = 0u;
          if (SR) bits = full_vec ? mix32(static_cast<uint32_t>(base + k) ^ hk)
                                  : random_bits(s.key, base + k);
          pv[k] = from_f32<F, SR>(nv, bits);
        }
        if (full_vec) {
          Pack<S> out;
#pragma unroll
          for (int k = 0; k < N; ++k) out.v[k] = pv[k];
          store_pack(p + base, out);
        } else {
#pragma unroll
          for (int k = 0; k < N; ++k)
            if (c0 + k < geo.n) p[base + k] = pv[k];
        }
      }
    }
  }

  if (PASS == kStats) {
#pragma unroll
    for (int k = 0; k < N; ++k) col_smem[warp * TC + lane * N + k] = colacc[k];
    __syncthreads();
    for (int t = threadIdx.x; t < TC; t += kThreads) {
      float sum = 0.0f;
      for (int w = 0; w < kWarps; ++w) sum += col_smem[w * TC + t];
      const int64_t col = cb * TC + t;
      if (col < geo.n) sc.colpart[srb * geo.n + col] = sum;
    }
    if (bad) *sc.bad = 1;
  }
  if (PASS != kApply) {
    const float total = block_sum(acc, red_smem);
    if (threadIdx.x == 0) sc.part[tile] = total;
  }
}

// New r and c from the per-tile sums (fixed order, double), written only for finite gradients:
// r = torch.add(r * beta, mean(G, -1), alpha=1-beta), one fma as the reference.
__global__ void __launch_bounds__(kThreads)
    state_kernel(float* __restrict__ row_state, float* __restrict__ col_state, AdaLomoScalars s,
                 Scratch sc, Geom geo) {
  if (*sc.bad) return;
  const int64_t rows = geo.slices * geo.m;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < rows) {
    double sum = 0.0;
    for (int64_t cb = 0; cb < geo.ncb; ++cb) sum += sc.rowpart[cb * rows + t];
    const float mean = static_cast<float>(sum / static_cast<double>(geo.n));
    row_state[t] = __fmaf_rn(mean, s.one_minus_beta, __fmul_rn(row_state[t], s.beta));
  } else if (t - rows < geo.slices * geo.n) {
    const int64_t i = t - rows, slice = i / geo.n, j = i % geo.n;
    double sum = 0.0;
    for (int64_t rb = 0; rb < geo.nrb; ++rb) sum += sc.colpart[(slice * geo.nrb + rb) * geo.n + j];
    const float mean = static_cast<float>(sum / static_cast<double>(geo.m));
    col_state[i] = __fmaf_rn(mean, s.one_minus_beta, __fmul_rn(col_state[i], s.beta));
  }
}

__device__ __forceinline__ float rms_of(double sum_sq, int64_t numel) {
  return static_cast<float>(sqrt(sum_sq) / sqrt(static_cast<double>(numel)));
}

// Sum of part[0 .. count) in a fixed order by one block (valid in every thread).
__device__ double sum_parts(const float* part, int64_t count, double* smem) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += part[i];
  return block_sum(acc, smem);
}

// One block after pass 1: the overflow flag, lr_t and decay, and (factored) mean(r) per slice.
__global__ void __launch_bounds__(kFinalThreads)
    finalize_stats_kernel(const float* __restrict__ row_state, AdaLomoScalars s, Scratch sc,
                          Geom geo, int64_t parts, bool factored, float* __restrict__ found_inf) {
  __shared__ double smem[32];
  if (*sc.bad) {
    if (threadIdx.x == 0 && found_inf) *found_inf = 1.0f;
    return;
  }
  const double pp = sum_parts(sc.part, parts, smem);
  if (threadIdx.x == 0) {
    const float lr_t = adalomo_lr_t(s, rms_of(pp, geo.numel));
    sc.scalars[0] = lr_t;
    sc.scalars[1] = adalomo_decay(s, lr_t);
  }
  if (!factored) return;
  if (geo.slices >= 32) {  // many small slices: one thread each, sequential sums
    for (int64_t sl = threadIdx.x; sl < geo.slices; sl += blockDim.x) {
      double sum = 0.0;
      for (int64_t i = 0; i < geo.m; ++i) sum += row_state[sl * geo.m + i];
      sc.meanr[sl] = static_cast<float>(sum / static_cast<double>(geo.m));
    }
  } else {
    for (int64_t sl = 0; sl < geo.slices; ++sl) {
      double acc = 0.0;
      for (int64_t i = threadIdx.x; i < geo.m; i += blockDim.x) acc += row_state[sl * geo.m + i];
      acc = block_sum(acc, smem);
      if (threadIdx.x == 0) sc.meanr[sl] = static_cast<float>(acc / static_cast<double>(geo.m));
    }
  }
}

// One block after pass 2: denom = max(1, rms(u) / clip_threshold).
__global__ void __launch_bounds__(kFinalThreads)
    finalize_unorm_kernel(AdaLomoScalars s, Scratch sc, Geom geo, int64_t parts) {
  __shared__ double smem[32];
  if (*sc.bad) return;
  const double uu = sum_parts(sc.part, parts, smem);
  if (threadIdx.x == 0) sc.scalars[2] = adalomo_denom(s, rms_of(uu, geo.numel));
}

// ---- unfactored passes: a fixed grid of blocks striding over N-element packs ---------------------
template <Fmt F, bool SR, bool DIV, int PASS>
__global__ void __launch_bounds__(kThreads)
    flat_kernel(storage_t<F>* __restrict__ p, const storage_t<F>* __restrict__ g,
                float* __restrict__ v, AdaLomoScalars s, const float* __restrict__ clip_coef,
                Scratch sc, int64_t n, bool vec) {
  using S = storage_t<F>;
  constexpr int N = Pack<S>::N;
  __shared__ float red_smem[32];
  if (PASS != kStats && *sc.bad) return;
  const float coef = clip_coef ? *clip_coef : 1.0f;
  float lr_t = 0.0f, decay = 1.0f, denom = 1.0f;
  if (PASS == kApply) {
    lr_t = sc.scalars[0];
    decay = sc.scalars[1];
    denom = sc.scalars[2];
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * N;
  float acc = 0.0f;
  bool bad = false;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N;
       base < n; base += stride) {
    const bool full_vec = vec && base + N <= n;
    S gv[N], pv[N];
    load_n(g + base, gv, base, n, full_vec);
    if (PASS != kUnorm) load_n(p + base, pv, base, n, full_vec);
    const uint32_t hk = SR ? hash_high_key(s.key, base) : 0u;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (base + k >= n) break;
      const float graw = to_f32<F>(gv[k]);
      if (PASS == kStats) {
        bad |= !is_finite_f32(graw);
        const float pf = to_f32<F>(pv[k]);
        acc += pf * pf;
      } else {
        const float gp = preprocess<DIV>(graw, s.scale, s.clip, coef);
        if (PASS == kUnorm) {
          // v = torch.add(v * beta, G, alpha=1-beta): one fma; u = rsqrt(v) * g
          const float G = __fadd_rn(__fmul_rn(gp, gp), s.eps1);
          const float vn = __fmaf_rn(G, s.one_minus_beta, __fmul_rn(v[base + k], s.beta));
          v[base + k] = vn;
          const float u = __fmul_rn(1.0f / sqrtf(vn), gp);
          acc += u * u;
        } else {
          const float u = __fdiv_rn(__fmul_rn(1.0f / sqrtf(v[base + k]), gp), denom);
          const float nv = __fsub_rn(__fmul_rn(to_f32<F>(pv[k]), decay), __fmul_rn(lr_t, u));
          // packs start at multiples of N: no crossing of a multiple of 2**32 inside one
          const uint32_t bits = SR ? mix32(static_cast<uint32_t>(base + k) ^ hk) : 0u;
          pv[k] = from_f32<F, SR>(nv, bits);
        }
      }
    }
    if (PASS == kApply) {
      if (full_vec) {
        Pack<S> out;
#pragma unroll
        for (int k = 0; k < N; ++k) out.v[k] = pv[k];
        store_pack(p + base, out);
      } else {
        for (int k = 0; k < N && base + k < n; ++k) p[base + k] = pv[k];
      }
    }
  }
  if (PASS == kStats && bad) *sc.bad = 1;
  if (PASS != kApply) {
    const float total = block_sum(acc, red_smem);
    if (threadIdx.x == 0) sc.part[blockIdx.x] = total;
  }
}

// One byte buffer carved into 16-byte aligned float/int arrays; only the flag needs zeroing.
at::Tensor alloc_scratch(const at::Tensor& like, const Geom& geo, int64_t parts, bool factored,
                         Scratch& sc) {
  auto up = [](int64_t bytes) { return (bytes + 15) / 16 * 16; };
  const int64_t rows = geo.slices * geo.m;
  const int64_t sizes[] = {up(4), up(4 * 4), up(4 * geo.slices),
                           up(4 * (factored ? geo.ncb * rows : 0)),
                           up(4 * (factored ? geo.slices * geo.nrb * geo.n : 0)), up(4 * parts)};
  int64_t total = 0;
  for (int64_t b : sizes) total += b;
  at::Tensor buf = at::empty({total}, like.options().dtype(at::kByte));
  char* base = static_cast<char*>(buf.data_ptr());
  char* ptrs[6];
  for (int i = 0; i < 6; ++i) {
    ptrs[i] = base;
    base += sizes[i];
  }
  sc = {reinterpret_cast<int*>(ptrs[0]),   reinterpret_cast<float*>(ptrs[1]),
        reinterpret_cast<float*>(ptrs[2]), reinterpret_cast<float*>(ptrs[3]),
        reinterpret_cast<float*>(ptrs[4]), reinterpret_cast<float*>(ptrs[5])};
  C10_CUDA_CHECK(cudaMemsetAsync(sc.bad, 0, sizeof(int), at::cuda::getCurrentCUDAStream()));
  return buf;
}

template <Fmt F, bool SR, bool DIV>
void run(at::Tensor& param, const at::Tensor& grad, float* row, float* col, float* v,
         const AdaLomoScalars& s, const float* coef, float* found) {
  using S = storage_t<F>;
  constexpr int N = Pack<S>::N;
  S* p = reinterpret_cast<S*>(param.data_ptr());
  const S* g = reinterpret_cast<const S*>(grad.data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool factored = param.dim() >= 2;
  Geom geo{1, 1, 1, 1, 1, param.numel()};
  Scratch sc;
  if (factored) {
    geo.n = param.size(-1);
    geo.m = param.size(-2);
    geo.slices = geo.numel / (geo.m * geo.n);
    geo.nrb = ceil_div(geo.m, kTileRows);
    geo.ncb = ceil_div(geo.n, 32 * N);
    // 16-byte packs need aligned rows: n a multiple of N and aligned base pointers
    const bool vec = geo.n % N == 0 && aligned16(p) && aligned16(g);
    const int64_t tiles = geo.slices * geo.nrb * geo.ncb;
    TORCH_CHECK(tiles < (int64_t{1} << 31), "adalomo_update_: tensor too large (", tiles,
                " tiles)");
    at::Tensor keep = alloc_scratch(param, geo, tiles, true, sc);
    tile_kernel<F, false, DIV, kStats><<<tiles, kThreads, 0, stream>>>(p, g, row, col, s, coef,
                                                                        sc, geo, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t state_threads = geo.slices * (geo.m + geo.n);
    state_kernel<<<ceil_div(state_threads, kThreads), kThreads, 0, stream>>>(row, col, s, sc, geo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_stats_kernel<<<1, kFinalThreads, 0, stream>>>(row, s, sc, geo, tiles, true, found);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tile_kernel<F, false, DIV, kUnorm><<<tiles, kThreads, 0, stream>>>(p, g, row, col, s, coef,
                                                                        sc, geo, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_unorm_kernel<<<1, kFinalThreads, 0, stream>>>(s, sc, geo, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tile_kernel<F, SR, DIV, kApply><<<tiles, kThreads, 0, stream>>>(p, g, row, col, s, coef,
                                                                     sc, geo, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // `keep` (the scratch) is released here; the caching allocator reuses it only for work
    // queued later on this stream.
  } else {
    const bool vec = aligned16(p) && aligned16(g) && aligned16(v);
    const int64_t blocks = std::min<int64_t>(ceil_div(ceil_div(geo.numel, N), kThreads),
                                             kMaxFlatBlocks);
    at::Tensor keep = alloc_scratch(param, geo, blocks, false, sc);
    const int64_t n = geo.numel;
    flat_kernel<F, false, DIV, kStats><<<blocks, kThreads, 0, stream>>>(p, g, v, s, coef, sc, n,
                                                                         vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_stats_kernel<<<1, kFinalThreads, 0, stream>>>(nullptr, s, sc, geo, blocks, false,
                                                           found);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    flat_kernel<F, false, DIV, kUnorm><<<blocks, kThreads, 0, stream>>>(p, g, v, s, coef, sc, n,
                                                                         vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_unorm_kernel<<<1, kFinalThreads, 0, stream>>>(s, sc, geo, blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    flat_kernel<F, SR, DIV, kApply><<<blocks, kThreads, 0, stream>>>(p, g, v, s, coef, sc, n,
                                                                      vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace cuda

void adalomo_update_cuda(ADALOMO_UPDATE_PARAMS) {
  constexpr const char* op = "adalomo_update_";
  check_common(op, param, grad, clip_coef, found_inf);
  check_not_implemented(op, grad_sq, stage);
  CHECK_CUDA(op, param);
  check_adalomo_state(param, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq);
  const bool sr = parse_rounding(op, rounding);
  if (param.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const Preprocess pre = make_preprocess(loss_scale, clip_grad_value);
  const AdaLomoScalars s =
      make_adalomo_scalars(pre, lr, weight_decay, beta, eps1, eps2, clip_threshold, seed, step);
  const float* coef = clip_coef.has_value() ? clip_coef->data_ptr<float>() : nullptr;
  float* found = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  float* row = exp_avg_sq_row.has_value() ? exp_avg_sq_row->data_ptr<float>() : nullptr;
  float* col = exp_avg_sq_col.has_value() ? exp_avg_sq_col->data_ptr<float>() : nullptr;
  float* v = exp_avg_sq.has_value() ? exp_avg_sq->data_ptr<float>() : nullptr;

  auto dispatch = [&](auto f_tag) {
    constexpr Fmt F = decltype(f_tag)::value;
    if constexpr (F != Fmt::F32) {  // fp32 stores are exact: no stochastic variant
      if (sr) {
        if (pre.divide) cuda::run<F, true, true>(param, grad, row, col, v, s, coef, found);
        else cuda::run<F, true, false>(param, grad, row, col, v, s, coef, found);
        return;
      }
    }
    if (pre.divide) cuda::run<F, false, true>(param, grad, row, col, v, s, coef, found);
    else cuda::run<F, false, false>(param, grad, row, col, v, s, coef, found);
  };
  switch (param.scalar_type()) {
    case at::kFloat: dispatch(std::integral_constant<Fmt, Fmt::F32>{}); break;
    case at::kHalf: dispatch(std::integral_constant<Fmt, Fmt::F16>{}); break;
    case at::kBFloat16: dispatch(std::integral_constant<Fmt, Fmt::BF16>{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", param.scalar_type());
  }
}

}  // namespace lomo
