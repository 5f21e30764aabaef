// Per-call scalars of both updates, computed once on the host (double, then rounded to fp32 as
// reference.py does), and the gradient preprocessing every kernel applies element-wise.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "rounding.h"

namespace lomo {

// docs/spec.md "Gradient preprocessing": g / loss_scale, clamp(+-clip_grad_value), * clip_coef.
struct Preprocess {
  float scale;  // divisor when `divide`, else an exact multiplier (1 or 1/loss_scale)
  float clip;   // +Inf when value clipping is off: the clamp is then the identity
  bool divide;
};

inline Preprocess make_preprocess(double loss_scale, double clip_grad_value) {
  Preprocess pre{1.0f, std::numeric_limits<float>::infinity(), false};
  if (loss_scale != 1.0) {
    float s = static_cast<float>(loss_scale);
    int e = 0;
    // g / 2**k == g * 2**-k exactly (both are the rounding of the same real number), so a
    // power-of-two loss scale (the usual case) costs a multiply instead of a division.
    if (std::isfinite(s) && s > 0.0f && std::frexp(s, &e) == 0.5f && e > -125 && e < 126) {
      pre.scale = 1.0f / s;
    } else {
      pre.scale = s;
      pre.divide = true;
    }
  }
  if (clip_grad_value > 0) pre.clip = static_cast<float>(clip_grad_value);
  return pre;
}

// Multiplying by 1 (no loss scale, no clip_coef) is exact, so the disabled steps are no-ops.
// CLIP = false: neither value clipping nor clip_coef is on (clip = +Inf, coef = 1), and the
// clamp and the multiply, identities then, are left out (CPU loops: 3 of 4 vector operations).
template <bool DIV, bool CLIP = true>
LOMO_HD float preprocess(float g, float scale, float clip, float coef) {
  g = DIV ? g / scale : g * scale;
  if (!CLIP) return g;
  g = g < -clip ? -clip : g;  // two selects: one vmaxps / vminps each
  g = g > clip ? clip : g;
  return g * coef;
}

struct LomoScalars {
  float scale, clip;
  float decay;   // (float)(1 - lr * weight_decay)
  float neg_lr;  // (float)(-lr): torch.add(p, g, alpha=-lr) is one fma per element
  uint32_t key;  // stochastic-rounding key of (seed, step)
};

inline LomoScalars make_lomo_scalars(const Preprocess& pre, double lr, double weight_decay,
                                     int64_t seed, int64_t step) {
  return {pre.scale, pre.clip, static_cast<float>(1.0 - lr * weight_decay),
          static_cast<float>(-lr), rounding_key(seed, step)};
}

struct AdaLomoScalars {
  float scale, clip;
  float beta, one_minus_beta, eps1;
  float lr, weight_decay, eps2, clip_threshold;
  uint32_t key;
};

inline AdaLomoScalars make_adalomo_scalars(const Preprocess& pre, double lr, double weight_decay,
                                           double beta, double eps1, double eps2,
                                           double clip_threshold, int64_t seed, int64_t step) {
  return {pre.scale,
          pre.clip,
          static_cast<float>(beta),
          static_cast<float>(1.0 - beta),
          static_cast<float>(eps1),
          static_cast<float>(lr),
          static_cast<float>(weight_decay),
          static_cast<float>(eps2),
          static_cast<float>(clip_threshold),
          rounding_key(seed, step)};
}

// The AdaLomo step scalars from the reduced statistics, in reference.py's fp32 order:
// lr_t = lr * max(eps2, rms(p)); decay = 1 - lr_t * wd; denom = max(1, rms(u) / clip_threshold).
LOMO_HD float adalomo_lr_t(const AdaLomoScalars& s, float rms_p) {
  return s.lr * (rms_p < s.eps2 ? s.eps2 : rms_p);  // NaN propagates, as torch.clamp
}
LOMO_HD float adalomo_decay(const AdaLomoScalars& s, float lr_t) {
  return 1.0f - lr_t * s.weight_decay;
}
LOMO_HD float adalomo_denom(const AdaLomoScalars& s, float rms_u) {
  float d = rms_u / s.clip_threshold;
  return d < 1.0f ? 1.0f : d;
}

// GoLore's inner optimizer (reference.golore_update_): host scalars as reference.golore_scalars.
enum class Inner { AdamW, Sgd, SgdMomentum };

struct GoloreScalars {
  float b1, omb1, b2, omb2, bc1, bc2, eps, momentum;
  float decay;         // (float)(1 - lr * weight_decay)     (full-rank mode)
  float neg_lr_scale;  // (float)(-lr * scale)
  uint32_t key;        // stochastic-rounding key of (seed, step)
};

inline GoloreScalars make_golore_scalars(Inner inner, double lr, double weight_decay, double scale,
                                         double beta1, double beta2, double eps, double momentum,
                                         int64_t seed, int64_t step) {
  const bool adam = inner == Inner::AdamW;
  const double t = static_cast<double>(step);
  return {static_cast<float>(beta1),
          static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2),
          static_cast<float>(adam ? 1.0 - std::pow(beta1, t) : 1.0),
          static_cast<float>(adam ? 1.0 - std::pow(beta2, t) : 1.0),
          static_cast<float>(eps),
          static_cast<float>(momentum),
          static_cast<float>(1.0 - lr * weight_decay),
          static_cast<float>(-lr * scale),
          rounding_key(seed, step)};
}

// N from g (r * clip_coef) and the state of one element, in reference.golore_update_'s float32
// order; the new state is written back through m / v / buf (the caller decides whether to store).
template <Inner I>
LOMO_HD float golore_direction(const GoloreScalars& s, float g, float& m, float& v, float& buf) {
  if constexpr (I == Inner::AdamW) {
#if defined(__CUDA_ARCH__)
    m = __fmaf_rn(g, s.omb1, __fmul_rn(m, s.b1));
    v = __fmaf_rn(__fmul_rn(g, g), s.omb2, __fmul_rn(v, s.b2));
    // sqrtf is IEEE in device code without fast-math (-prec-sqrt=true, the default)
    return __fdiv_rn(__fdiv_rn(m, s.bc1), __fadd_rn(sqrtf(__fdiv_rn(v, s.bc2)), s.eps));
#else
    m = __builtin_fmaf(g, s.omb1, m * s.b1);
    v = __builtin_fmaf(g * g, s.omb2, v * s.b2);
    return (m / s.bc1) / (__builtin_sqrtf(v / s.bc2) + s.eps);
#endif
  } else if constexpr (I == Inner::SgdMomentum) {
    buf = buf * s.momentum + g;
    return buf;
  } else {
    return g;
  }
}

}  // namespace lomo
