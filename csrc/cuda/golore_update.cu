// GoLore / GaLore inner optimizer on CUDA (reference.golore_update_): element-wise over r, fp32
// state, no host synchronisation. One kernel, run twice from one launcher:
//
//   pass 0 (kCheck):  any NaN/Inf in r -> bad = 1 (a zeroed device int; every writer stores 1)
//   pass 1 (kApply):  bad == 0: new state and N; projected mode r = N, full-rank mode
//                     p = round(p * decay - lr * scale * N); bad == 1: projected mode fills r with
//                     NaN (nothing computed from it can be applied), found_inf = 1.
//
// r is small (r x n or m x r fp32; the GEMMs around this kernel move far more bytes), so the loads
// are scalar and coalesced (grid-stride, 64-bit indices); no reduction, hence deterministic.
#include <ATen/ops/empty.h>

#include <cmath>

#include "checks.h"
#include "cuda/vec.cuh"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace LOMO_CUDA_NS {
namespace {

constexpr int kCheck = 0, kApply = 1;

struct GoloreArgs {
  GoloreScalars s;
  const void* r;  // float32 (projected mode) or, full rank, the gradient (param's dtype or float32)
  float* out;     // projected mode: N is written over r
  void* p;        // full-rank mode: the parameter
  float *m, *v, *buf;
  const float* clip_coef;  // nullptr: off
  int* bad;                // pass-0 flag, read by pass 1
  float* found_inf;        // nullptr: not reported
  int64_t n;
};

template <Fmt F, Fmt GF, bool SR, Inner I, bool FULL>
__global__ void __launch_bounds__(kThreads) golore_update_kernel(GoloreArgs a, int pass) {
  LOMO_BOUNDS(kThreads);
  using S = storage_t<F>;
  // not __restrict__: in projected mode N is written over r (a.out == a.r)
  const storage_t<GF>* r = static_cast<const storage_t<GF>*>(a.r);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pass == kCheck) {
    bool ok = true;
    for (int64_t i = tid; i < a.n; i += stride) ok &= is_finite_f32(to_f32<GF>(r[i]));
    if (!ok) *a.bad = 1;
    return;
  }
  if (*a.bad != 0) {
    if (!FULL)
      for (int64_t i = tid; i < a.n; i += stride) a.out[i] = f32_from_bits(0x7FC00000u);  // NaN
    if (tid == 0 && a.found_inf) *a.found_inf = 1.0f;
    return;
  }
  const GoloreScalars s = a.s;
  const float coef = a.clip_coef ? *a.clip_coef : 1.0f;
  // the stride is re-read from gridDim: kept live across the IEEE division's slow-path calls it
  // was spilled to the stack (sm_90)
  for (int64_t i = tid; i < a.n; i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float g = __fmul_rn(to_f32<GF>(r[i]), coef);
    float m = 0.0f, v = 0.0f, b = 0.0f;
    if constexpr (I == Inner::AdamW) {
      m = a.m[i];
      v = a.v[i];
    }
    if constexpr (I == Inner::SgdMomentum) b = a.buf[i];
    const float nv = golore_direction<I>(s, g, m, v, b);
    if constexpr (I == Inner::AdamW) {
      a.m[i] = m;
      a.v[i] = v;
    }
    if constexpr (I == Inner::SgdMomentum) a.buf[i] = b;
    if constexpr (FULL) {
      S* __restrict__ p = static_cast<S*>(a.p);  // full rank: r is the gradient, not p
      const float pv = __fmaf_rn(nv, s.neg_lr_scale, __fmul_rn(to_f32<F>(p[i]), s.decay));
      const uint32_t bits = SR ? random_bits(s.key, static_cast<uint64_t>(i)) : 0u;
      p[i] = from_f32<F, SR>(pv, bits);
    } else {
      a.out[i] = nv;
    }
  }
}

// The one launcher: both passes, on the current stream.
template <Fmt F, Fmt GF, bool SR, Inner I, bool FULL>
void launch(const GoloreArgs& a) {
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(a.n, kThreads), sm_count() * 32));
  const Stream stream = current_stream();
  for (int pass : {kCheck, kApply})
    LOMO_LAUNCH(golore_update_kernel<F, GF, SR, I, FULL>, blocks, kThreads, 0, stream, a, pass);
}

}  // namespace

void golore_update(GOLORE_UPDATE_PARAMS) {
  const GoloreSetup c = golore_setup(GOLORE_UPDATE_ARGS);
  LOMO_CHECK_DEVICE("golore_update_", r);
  const int64_t n = r.numel();
  if (n == 0) return;
  const DeviceGuard guard(r.device());
  const bool full = param.has_value();
  // Stream-ordered scratch: the caching allocator reuses it only for work queued after ours.
  at::Tensor bad = at::empty({1}, r.options().dtype(at::kInt));
  memset_async(bad.data_ptr<int>(), 0, sizeof(int), current_stream());
  const GoloreArgs a{c.s,
                           r.data_ptr(),
                           full ? nullptr : r.data_ptr<float>(),
                           full ? param->data_ptr() : nullptr,
                           float_ptr(exp_avg),
                           float_ptr(exp_avg_sq),
                           float_ptr(momentum_buffer),
                           float_ptr(clip_coef),
                           bad.data_ptr<int>(),
                           float_ptr(found_inf),
                           n};
  auto with_inner = [&](auto f_tag, auto g_tag, auto sr_tag, auto full_tag) {
    constexpr Fmt F = decltype(f_tag)::value, GF = decltype(g_tag)::value;
    constexpr bool SR = decltype(sr_tag)::value, FULL = decltype(full_tag)::value;
    switch (c.kind) {
      case Inner::AdamW: launch<F, GF, SR, Inner::AdamW, FULL>(a); break;
      case Inner::SgdMomentum: launch<F, GF, SR, Inner::SgdMomentum, FULL>(a); break;
      case Inner::Sgd: launch<F, GF, SR, Inner::Sgd, FULL>(a); break;
    }
  };
  // full rank with a 16-bit parameter: r is its gradient, of its dtype or a float32 buffer
  auto with_grad = [&](auto f_tag, auto sr_tag) {
    if (r.scalar_type() == at::kFloat)
      with_inner(f_tag, std::integral_constant<Fmt, Fmt::F32>{}, sr_tag, std::true_type{});
    else
      with_inner(f_tag, f_tag, sr_tag, std::true_type{});
  };
  auto with_format = [&](auto f_tag) {
    constexpr Fmt F = decltype(f_tag)::value;
    if constexpr (F != Fmt::F32) {  // only full-rank updates store to bf16/fp16 (and round)
      if (c.stochastic)
        with_grad(f_tag, std::true_type{});
      else
        with_grad(f_tag, std::false_type{});
    } else if (full) {
      with_inner(f_tag, f_tag, std::false_type{}, std::true_type{});
    } else {
      with_inner(f_tag, f_tag, std::false_type{}, std::false_type{});
    }
  };
  switch (full ? param->scalar_type() : at::kFloat) {
    case at::kFloat: with_format(std::integral_constant<Fmt, Fmt::F32>{}); break;
    case at::kHalf: with_format(std::integral_constant<Fmt, Fmt::F16>{}); break;
    case at::kBFloat16: with_format(std::integral_constant<Fmt, Fmt::BF16>{}); break;
    default: TORCH_CHECK(false, "golore_update_: unsupported dtype ", param->scalar_type());
  }
}

}  // namespace LOMO_CUDA_NS
}  // namespace lomo
