"""Microbenchmark of the fused LOMO update, ``ops.lomo_update_`` (docs/spec.md:
``p = p * (1 - lr * weight_decay) - lr * g``; fewest bytes: read p, read g, write p = 6 B/element
in bf16).

Implementations timed on the same parameters, each the way its users run it:

* this project, every backend that loaded and runs on the device (``native``, ``triton`` on
  CUDA, ``torch`` = the reference), called as ``lomo_kernels.Lomo``'s hook calls it: the
  backend's op (``ops.get_impl``, the checks of the public ``ops.lomo_update_`` are done once
  by the optimizer, not per call) with the arguments the hook passes (a device ``found_inf``
  flag, the gradient-norm accumulator ``grad_sq`` and the optimizer's workspace, allocated
  once);
* ``lomo_optim``: exactly what ``lomo_optim.Lomo``'s hook (0.1.1, non-ZeRO ``fuse_update``)
  executes for one parameter (``lomo_optim_lomo_update`` below);
* ``sgd_fused``: ``torch.optim.SGD(params, lr, fused=True).step()`` with the gradients in
  ``p.grad`` (``sgd_foreach`` where this torch has no fused SGD for the device/dtype).

The user configuration per dtype is lomo-optim's: bf16 and fp32 losses run with no loss scale
and no clipping; an fp16 loss makes lomo-optim create its dynamic loss scaler and switch on
global-norm clipping (clip_grad_norm=1.0), so the fp16 rows include the gradient unscale, the
clip coefficient (a 0-d device tensor, as after ``grad_norm``) and lomo-optim's per-parameter
overflow check. The loss scale is 2**16 (a settled value of the scaler, which starts at 2**32).
A whole model ("llama7b", "llama3-8b") is one update pass over its full parameter list: a loop of
per-parameter updates (this project, lomo_optim) or one optimizer step over all (SGD).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/bench_lomo_update.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import microbench, same_bytes
from bench.results import Row

OP = "lomo_update"
REFERENCES = ("lomo_optim", "torch", "sgd_fused", "sgd_foreach")
LR = 1e-4
FP16_LOSS_SCALE = 2.0**16
FP16_CLIP_COEF = 0.5


# ---------------------------------------------------------------------------------------------
# lomo-optim 0.1.1, one parameter
# ---------------------------------------------------------------------------------------------


def _lomo_optim_has_inf_or_nan(x: torch.Tensor) -> bool:
    """``lomo_optim.lomo.DynamicLossScaler._has_inf_or_nan``: an fp32 copy, a sum, a host sync."""
    try:
        cpu_sum = float(x.float().sum())
    except RuntimeError as instance:
        if "value cannot be converted" not in instance.args[0]:
            raise
        return True
    return cpu_sum in [float("inf"), -float("inf")] or cpu_sum != cpu_sum


def lomo_optim_lomo_update(p, g, *, lr, weight_decay=0.0, loss_scale=None, clip_grad_value=None,
                           clip_grad_norm=None, clip_coef=None) -> None:
    """What ``lomo_optim.Lomo.fuse_update()``'s hook executes for ONE parameter ``p`` whose
    gradient is ``g`` (``loss_scale``: the dynamic scaler's current scale when the loss is fp16,
    else None), statement by statement: overflow check (fp16 only), fp32 upcast of the gradient,
    unscale, value clipping, norm clipping, fp32 upcast of the parameter, weight decay, the
    update, ``p.data.copy_``. (Dropping ``p.grad`` is the caller's business here.)"""
    with torch.no_grad():
        if loss_scale is not None and _lomo_optim_has_inf_or_nan(g):
            return  # lomo-optim drops the gradient and skips the step
        grad_fp32 = g.to(torch.float32)
        if loss_scale:
            grad_fp32.div_(loss_scale)
        if clip_grad_value is not None and clip_grad_value > 0:
            grad_fp32.clamp_(min=-clip_grad_value, max=clip_grad_value)
        if clip_grad_norm is not None and clip_grad_norm > 0 and clip_coef is not None:
            grad_fp32.mul_(clip_coef)
        p_fp32 = p.data.to(torch.float32)
        if weight_decay > 0.0:
            p_fp32.mul_(1.0 - lr * weight_decay)
        p_fp32.add_(grad_fp32, alpha=-lr)
        p.data.copy_(p_fp32)


# ---------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------


def user_config(dtype: torch.dtype, device) -> dict:
    """lomo-optim's configuration for a loss of this dtype (see the module docstring)."""
    if dtype == torch.float16:
        return dict(loss_scale=FP16_LOSS_SCALE, clip_grad_norm=1.0,
                    clip_coef=torch.tensor(FP16_CLIP_COEF, dtype=torch.float32, device=device))
    return dict(loss_scale=None, clip_grad_norm=None, clip_coef=None)


def sgd_variant(device, dtype) -> str:
    """``sgd_fused`` where this torch runs fused SGD for the device and dtype, else
    ``sgd_foreach``."""
    try:
        p = torch.zeros(8, dtype=dtype, device=device)
        p.grad = torch.ones_like(p)
        torch.optim.SGD([p], lr=0.1, fused=True).step()
        return "sgd_fused"
    except (RuntimeError, ValueError, TypeError):
        return "sgd_foreach"


def candidate_names(device, dtype, backends=None) -> list[tuple[str, str]]:
    names = [(b, "kernel") for b in microbench.kernel_backends(device, backends)]
    for ref in ("lomo_optim", sgd_variant(device, dtype)):
        if not backends or ref in backends or (ref.startswith("sgd") and "sgd" in backends):
            names.append((ref, "reference"))
    return names


def candidates(device, dtype, params, grads, backends, rounding="nearest"):
    """``rounding``: of the kernels' stores (bf16 / fp16; the references round to nearest)."""
    from lomo_kernels import ops

    cfg = user_config(dtype, device)
    flag = torch.zeros(1, dtype=torch.float32, device=device)
    out = []
    for name, kind in candidate_names(device, dtype, backends):
        if kind == "kernel":
            def setup(b=name):
                impl = ops.get_impl("lomo_update_", b, device)  # what the optimizer's hook calls
                buf = microbench.hook_buffers("lomo_update_", params, b, device)
                args = (cfg["clip_coef"], flag, LR, 0.0, cfg["loss_scale"] or 1.0, 0.0, rounding,
                        0, 1, buf["grad_sq"], buf["workspace"])

                def fn():
                    for p, g in zip(params, grads):
                        impl(p, g, *args)
                return fn, list

            out.append(microbench.Candidate(name, kind, setup))
        elif name == "lomo_optim":
            def setup():
                def fn():
                    for p, g in zip(params, grads):
                        lomo_optim_lomo_update(p, g, lr=LR, **cfg)
                return fn, list

            out.append(microbench.Candidate(name, kind, setup))
        else:  # sgd_fused / sgd_foreach
            def setup(name=name):
                for p, g in zip(params, grads):
                    p.grad = g
                fused = name == "sgd_fused"
                opt = torch.optim.SGD(params, lr=LR, fused=fused or None, foreach=not fused)
                return opt.step, lambda: [opt.state]

            note = "" if name == "sgd_fused" else "fused SGD unsupported here: foreach"
            if dtype == torch.float16:
                note = (note + "; " if note else "") + "no loss scaling or clipping"
            out.append(microbench.Candidate(name, kind, setup, note))
    return out


def grad_std(dtype) -> float:
    """Stored gradients of about 1e-3, loss-scaled (2**16) in fp16 as lomo-optim's scaler leaves
    them."""
    return 1e-3 * FP16_LOSS_SCALE if dtype == torch.float16 else 1e-3


def n_measurements(device, dtypes, shapes, backends=None) -> int:
    return microbench.n_measurements(sys.modules[__name__], device, dtypes, shapes, backends)


def same_bytes_stream(params, grads):
    """The reference of the bandwidth fraction: read p and g, write p (bench/same_bytes.py)."""
    return same_bytes.stream_fn(OP, params, grads)


def run(device, dtypes, shapes, *, backends=None, timing=None, progress=None,
        **_) -> list[Row]:
    """Time every implementation for each dtype and shape; returns the result rows.

    ``dtypes``: torch dtypes or names ("bf16"); ``shapes``: tokens ("4096x4096", "llama7b") or
    ``(name, [shape, ...])`` pairs."""
    return microbench.run_op(sys.modules[__name__], device, dtypes, shapes, backends=backends,
                             timing_kw=timing, progress=progress)


def main(argv=None) -> None:
    microbench.op_script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
