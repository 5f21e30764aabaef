// Shared by the CPU AdaLomo files (docs/spec.md): one call's values, the step scalars, the
// apply element, and the entry points of the two kinds of parameter.
//   adalomo_factored.cpp: dim >= 2, three passes (stages 1-3);
//   adalomo_flat.cpp:     0-d / 1-d, two passes, and the multi-tensor op.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

#include "cpu/cpu_common.h"
#include "cpu/cpu_vec.h"
#include "update_args.h"

namespace lomo {
namespace cpu {

// The values of one adalomo_update_ call that both kinds of parameter use.
struct AdaCall {
  AdaLomoScalars s;
  float coef;      // clip_coef, 1 when off
  bool sr, div;    // stochastic rounding; a non-power-of-two loss scale
  bool clip;       // value clipping or clip_coef is on
  float* grad_sq;  // the gradient-norm side output, or null
  float* found;    // found_inf, or null
  int64_t stage;   // 0 (all passes) or 1, 2, 3
  int64_t numel_g; // unsharded numel: the divisor of rms(p), rms(u)
};

// The step scalars from the (reduced) header values, for every kind of parameter and call.
struct AdaStep {
  float denom, lr_t, decay;
  // p, u finite (sum(p*p), sum(u*u) finite), lr_t finite, |decay| <= 1: p * decay - lr_t * u is
  // finite or infinite, never NaN, so the apply pass needs no NaN select
  bool clean;
};

inline AdaStep step_scalars(const AdaLomoScalars& s, float sum_pp, float sum_uu, int64_t numel) {
  const auto rms = [&](float sum) {
    return static_cast<float>(std::sqrt(static_cast<double>(sum) / static_cast<double>(numel)));
  };
  AdaStep st;
  st.denom = adalomo_denom(s, rms(sum_uu));
  st.lr_t = adalomo_lr_t(s, rms(sum_pp));
  st.decay = adalomo_decay(s, st.lr_t);
  st.clean = std::isfinite(sum_pp) && std::isfinite(sum_uu) && std::isfinite(st.lr_t) &&
             std::fabs(st.decay) <= 1.0f;
  return st;
}

// One element of the apply pass in fp32: p * decay - lr_t * (u / denom). The step scalars are
// passed by value: read through a pointer they could alias p.
template <Fmt F, bool DEN1>
LOMO_CPU_INLINE float apply_value(float denom, float decay, float lr_t, storage_t<F> p, float u) {
  const float un = DEN1 ? u : u / denom;  // u / 1 == u exactly
  return to_f32<F>(p) * decay - lr_t * un;
}

// apply_value rounded to the stored dtype.
template <Fmt F, bool SR, bool DEN1>
LOMO_CPU_INLINE storage_t<F> apply_one(float denom, float decay, float lr_t, storage_t<F> p,
                                       float u, uint32_t bits) {
  return from_f32<F, SR>(apply_value<F, DEN1>(denom, decay, lr_t, p, u), bits);
}

// apply_one when nv cannot be NaN (AdaStep::clean; cpu_vec.h's round_clean: idx, hk the
// element's hash index); decay is a literal 1 in the caller when it is exactly 1 (the multiply
// folds away).
template <Fmt F, bool SR, bool DEN1>
LOMO_CPU_INLINE storage_t<F> apply_one_clean(float denom, float decay, float lr_t, storage_t<F> p,
                                             float u, uint32_t idx, uint32_t hk) {
  return round_clean<F, SR>(apply_value<F, DEN1>(denom, decay, lr_t, p, u), idx, hk);
}

inline void set_found(float* found) {
  if (found) found[0] = 1.0f;
}

// float32 workspace elements of a factored parameter of this shape.
int64_t factored_workspace_numel(c10::IntArrayRef shape);
// float32 workspace elements of k unfactored tensors of `units` chunks in all (multi: the
// multi-tensor op).
int64_t flat_workspace_numel(int64_t k, int64_t units, bool multi);

// One stage (or all, stage 0) of the update of a factored / unfactored parameter.
void factored_adalomo(const AdaCall& a, const at::Tensor& param, const at::Tensor& grad, float* r,
                      float* c, int64_t global_rows, const std::optional<at::Tensor>& workspace);
void flat_adalomo(const AdaCall& a, const at::Tensor& param, const at::Tensor& grad, float* v,
                  const std::optional<at::Tensor>& workspace);

}  // namespace cpu
}  // namespace lomo
