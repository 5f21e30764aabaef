"""@triton.jit arithmetic shared by the AdaLomo kernels (adalomo_factored.py, adalomo_vector.py):
the IEEE reciprocal square root, the step scalars from the header's sums and the update of the
elements, each op rounding as in reference.py (the kernels compile without fp contraction)."""

import triton
import triton.language as tl


@triton.jit
def rsqrt_rn(x):
    # IEEE 1/sqrt(x): closer to torch's CPU rsqrt than the approximate rsqrt.approx.f32
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(x))


@triton.jit
def step_scalars(sum_pp, sum_uu, sqrt_numel, lr, eps2, weight_decay, clip_threshold):
    """(lr_t, 1 - lr_t*wd, max(1, rms(u)/clip_threshold)) as reference.py: rms(x) = ||x|| /
    sqrt(numel); the clamps propagate NaN like torch.clamp."""
    rms_p = tl.math.div_rn(tl.math.sqrt_rn(sum_pp), sqrt_numel)
    lr_t = lr * tl.maximum(rms_p, eps2, propagate_nan=tl.PropagateNan.ALL)
    rms_u = tl.math.div_rn(tl.math.sqrt_rn(sum_uu), sqrt_numel)
    denom = tl.maximum(tl.math.div_rn(rms_u, clip_threshold), 1.0,
                       propagate_nan=tl.PropagateNan.ALL)
    return lr_t, 1.0 - lr_t * weight_decay, denom


@triton.jit
def update_elements(p, u, denom, lr_t, decay, DIVIDE: tl.constexpr):
    """p * (1 - lr_t*wd) - lr_t * u / denom (DIVIDE False: denom is 1, the division is exact)."""
    if DIVIDE:
        u = tl.math.div_rn(u, denom)
    return p * decay - lr_t * u
