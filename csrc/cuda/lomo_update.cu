// LOMO on CUDA: p = p * (1 - lr * wd) - lr * g in one pass (6 bytes per bf16 element), fp32
// math, 16-byte loads/stores when aligned, 64-bit indices, no host synchronisation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "cuda/vec.cuh"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace cuda {
namespace {

// One element; false when the raw gradient is NaN/Inf (p is then left as it is).
template <Fmt F, bool SR, bool DIV>
__device__ __forceinline__ bool lomo_elem(storage_t<F>& p, storage_t<F> g, const LomoScalars& s,
                                          float coef, uint32_t bits) {
  const float graw = to_f32<F>(g);
  if (!is_finite_f32(graw)) return false;
  const float gv = preprocess<DIV>(graw, s.scale, s.clip, coef);
  // torch.add(p * decay, g, alpha=-lr): one fma, as the reference
  const float nv = __fmaf_rn(gv, s.neg_lr, __fmul_rn(to_f32<F>(p), s.decay));
  p = from_f32<F, SR>(nv, bits);
  return true;
}

template <Fmt F, bool SR, bool DIV>
__global__ void __launch_bounds__(kThreads)
    lomo_update_kernel(storage_t<F>* __restrict__ p, const storage_t<F>* __restrict__ g,
                       LomoScalars s, const float* __restrict__ clip_coef,
                       float* __restrict__ found_inf, int64_t n, bool vec) {
  using S = storage_t<F>;
  constexpr int N = Pack<S>::N;
  const float coef = clip_coef ? *clip_coef : 1.0f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  bool ok = true;
  const int64_t nvec = vec ? n / N : 0;
  for (int64_t v = tid; v < nvec; v += stride) {
    const int64_t base = v * N;  // a multiple of N never crosses a multiple of 2**32
    const uint32_t hk = SR ? hash_high_key(s.key, base) : 0u;
    Pack<S> pp = load_pack(p + base);
    const Pack<S> gg = load_pack(g + base);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const uint32_t bits = SR ? mix32(static_cast<uint32_t>(base + k) ^ hk) : 0u;
      ok &= lomo_elem<F, SR, DIV>(pp.v[k], gg.v[k], s, coef, bits);
    }
    store_pack(p + base, pp);
  }
  for (int64_t i = nvec * N + tid; i < n; i += stride) {  // unaligned tensors and the tail
    const uint32_t bits = SR ? random_bits(s.key, i) : 0u;
    S pv = p[i];
    if (lomo_elem<F, SR, DIV>(pv, g[i], s, coef, bits))
      p[i] = pv;
    else
      ok = false;
  }
  if (!ok && found_inf) *found_inf = 1.0f;  // plain store: every writer writes 1
}

template <Fmt F, bool SR, bool DIV>
void launch(at::Tensor& param, const at::Tensor& grad, const LomoScalars& s, const float* coef,
            float* found, int64_t n) {
  using S = storage_t<F>;
  S* p = reinterpret_cast<S*>(param.data_ptr());
  const S* g = reinterpret_cast<const S*>(grad.data_ptr());
  const bool vec = aligned16(p) && aligned16(g);
  const int64_t units = vec ? std::max<int64_t>(n / Pack<S>::N, 1) : n;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min(ceil_div(units, kThreads), sms * 32);
  lomo_update_kernel<F, SR, DIV><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      p, g, s, coef, found, n, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

void lomo_update_cuda(LOMO_UPDATE_PARAMS) {
  constexpr const char* op = "lomo_update_";
  check_common(op, param, grad, clip_coef, found_inf);
  check_not_implemented(op, grad_sq);
  CHECK_CUDA(op, param);
  const bool sr = parse_rounding(op, rounding);
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const Preprocess pre = make_preprocess(loss_scale, clip_grad_value);
  const LomoScalars s = make_lomo_scalars(pre, lr, weight_decay, seed, step);
  const float* coef = clip_coef.has_value() ? clip_coef->data_ptr<float>() : nullptr;
  float* found = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;

  auto dispatch = [&](auto f_tag) {
    constexpr Fmt F = decltype(f_tag)::value;
    if constexpr (F != Fmt::F32) {  // fp32 stores are exact: no stochastic variant
      if (sr) {
        if (pre.divide) cuda::launch<F, true, true>(param, grad, s, coef, found, n);
        else cuda::launch<F, true, false>(param, grad, s, coef, found, n);
        return;
      }
    }
    if (pre.divide) cuda::launch<F, false, true>(param, grad, s, coef, found, n);
    else cuda::launch<F, false, false>(param, grad, s, coef, found, n);
  };
  switch (param.scalar_type()) {
    case at::kFloat: dispatch(std::integral_constant<Fmt, Fmt::F32>{}); break;
    case at::kHalf: dispatch(std::integral_constant<Fmt, Fmt::F16>{}); break;
    case at::kBFloat16: dispatch(std::integral_constant<Fmt, Fmt::BF16>{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", param.scalar_type());
  }
}

}  // namespace lomo
