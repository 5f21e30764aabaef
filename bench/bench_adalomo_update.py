"""Microbenchmark of the AdaLomo update, ``ops.adalomo_update_`` (docs/spec.md: factored second
moments, grouped update normalisation, relative step size; fewest bytes for a 2-d bf16 parameter:
g read 3x, p read 2x, p written once = 12 B/element; see bench/shapes.py for the 1-d count).

Implementations timed on the same parameters, each the way its users run it:

* this project, every backend that loaded and runs on the device (``native``, ``triton`` on
  CUDA, ``torch`` = the reference), called as ``lomo_kernels.AdaLomo``'s hook calls it: the
  backend's op (``ops.get_impl``; the checks of the public ``ops.adalomo_update_`` are done once
  by the optimizer, not per call) with the arguments the hook passes (loss scale 2**10, the
  fp32 row/column or full state, a device ``found_inf`` flag, the gradient-norm accumulator
  ``grad_sq`` and the optimizer's workspace, allocated once);
* ``lomo_optim``: exactly what ``lomo_optim.AdaLomo``'s hook (0.1.1, non-ZeRO ``fuse_update``)
  executes for one parameter (``lomo_optim_adalomo_update`` below), host synchronisations
  included (the Python ``max(eps, p_rms)`` on a device tensor, the tensor-valued ``alpha``);
* ``adafactor_foreach`` / ``adafactor_single``: ``torch.optim.Adafactor(params, foreach=True /
  False).step()`` with the gradients in ``p.grad`` (the closest stock PyTorch optimizer; its math
  differs in details: no update clipping by ``rms(u)``, its own step-size rule).

The configuration is lomo-optim's default for every dtype: ``loss_scale=2**10``, no clipping, no
weight decay, ``decay_rate=-0.8``; the step is fixed at t = 2 (beta = 1 - 2**-0.8) so that every
timed call does the same work. One deviation, for fp32 only: ``lomo_optim`` upcasts the gradient
with ``g.to(torch.float32)``, which for an fp32 gradient is the gradient itself, and then divides
it by the loss scale in place. In lomo-optim that gradient is discarded afterwards; here the same
gradient is reused for every timed call, so it would shrink by 2**10 per call into denormals
(which are slow on CPUs). The fp32 ``lomo_optim`` rows therefore divide by a loss scale of 1.0:
the same in-place pass, the same cost, the gradient unchanged.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/bench_adalomo_update.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import microbench, same_bytes
from bench.results import Row

OP = "adalomo_update"
REFERENCES = ("lomo_optim", "torch", "adafactor_foreach", "adafactor_single")
LR = 1e-3
LOSS_SCALE = 2.0**10
EPS = (1e-30, 1e-3)
CLIP_THRESHOLD = 1.0
DECAY_RATE = -0.8
STEP = 2


# ---------------------------------------------------------------------------------------------
# lomo-optim 0.1.1, one parameter
# ---------------------------------------------------------------------------------------------


def _approx_sq_grad(exp_avg_sq_row, exp_avg_sq_col):
    r_factor = (exp_avg_sq_row / exp_avg_sq_row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = exp_avg_sq_col.unsqueeze(-2).rsqrt()
    return torch.mul(r_factor, c_factor)


def _rms(tensor):
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def lomo_optim_adalomo_update(p, g, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, *, lr, step_num,
                              loss_scale=LOSS_SCALE, eps=EPS, clip_threshold=CLIP_THRESHOLD,
                              decay_rate=DECAY_RATE, clip_grad_value=None, clip_grad_norm=None,
                              clip_coef=None, weight_decay=0.0) -> None:
    """What ``lomo_optim.AdaLomo.fuse_update()``'s hook executes for ONE parameter ``p`` whose
    gradient is ``g``, statement by statement (``step_num`` = the optimizer's ``step_num``;
    ``exp_avg_sq_row``/``exp_avg_sq_col`` for a 2-d ``p``, ``exp_avg_sq`` for a 1-d one)."""
    with torch.no_grad():
        grad_fp32 = g.to(torch.float32)
        if loss_scale:
            grad_fp32.div_(loss_scale)
        if clip_grad_value is not None and clip_grad_value > 0:
            grad_fp32.clamp_(min=-clip_grad_value, max=clip_grad_value)
        if clip_grad_norm is not None and clip_grad_norm > 0 and clip_coef is not None:
            grad_fp32.mul_(clip_coef)

        if step_num == 0 and decay_rate < 0:
            decay_rate = -decay_rate
        beta2t = 1.0 - math.pow(step_num, decay_rate)
        update = (grad_fp32**2) + eps[0]

        if len(p.data.shape) > 1:
            exp_avg_sq_row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            exp_avg_sq_col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            update = _approx_sq_grad(exp_avg_sq_row, exp_avg_sq_col)
            update.mul_(grad_fp32)
        else:
            exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad_fp32)

        update.div_((_rms(update) / clip_threshold).clamp_(min=1.0))

        p_fp32 = p.data.to(torch.float32)
        p_rms = torch.norm(p_fp32, 2.0) / math.sqrt(p.numel())
        param_scale = max(eps[1], p_rms)  # a Python comparison with a device tensor: host sync
        lr = lr * param_scale

        if weight_decay > 0.0:
            p_fp32.mul_(1.0 - lr * weight_decay)
        p_fp32.add_(update, alpha=-lr)  # a 0-d tensor as alpha: another host sync
        p.data.copy_(p_fp32)


# ---------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------


def beta_for(step: int, decay_rate: float = DECAY_RATE) -> float:
    decay = -decay_rate if (step == 0 and decay_rate < 0) else decay_rate
    return 1.0 - math.pow(step, decay)


def has_adafactor() -> bool:
    return hasattr(torch.optim, "Adafactor")


def candidate_names(device, dtype, backends=None) -> list[tuple[str, str]]:
    names = [(b, "kernel") for b in microbench.kernel_backends(device, backends)]
    for ref in ("lomo_optim", "adafactor_foreach", "adafactor_single"):
        if not backends or ref in backends or (ref.startswith("adafactor") and "adafactor" in backends):
            names.append((ref, "reference"))
    return names


def _new_state(params, device):
    from lomo_kernels import ops

    states = []
    for p in params:
        states.append({k: torch.zeros(s, dtype=torch.float32, device=device)
                       for k, s in ops.adalomo_state_shapes(p.shape).items()})
    return states


def candidates(device, dtype, params, grads, backends, rounding="nearest"):
    """``rounding``: of the kernels' stores (bf16 / fp16; the references round to nearest)."""
    from lomo_kernels import ops

    flag = torch.zeros(1, dtype=torch.float32, device=device)
    beta = beta_for(STEP)
    out = []
    for name, kind in candidate_names(device, dtype, backends):
        if kind == "kernel":
            def setup(b=name):
                states = _new_state(params, device)
                impl = ops.get_impl("adalomo_update_", b, device)  # what the optimizer's hook calls
                buf = microbench.hook_buffers("adalomo_update_", params, b, device)
                head = (None, flag, LR, 0.0, LOSS_SCALE, 0.0, beta, EPS[0], EPS[1], CLIP_THRESHOLD,
                        rounding, 0, STEP, buf["grad_sq"], buf["workspace"])

                def fn():
                    for p, g, s in zip(params, grads, states):
                        impl(p, g, s.get("exp_avg_sq_row"), s.get("exp_avg_sq_col"),
                             s.get("exp_avg_sq"), *head)
                return fn, lambda: states

            out.append(microbench.Candidate(name, kind, setup))
        elif name == "lomo_optim":
            ls = 1.0 if dtype == torch.float32 else LOSS_SCALE

            def setup(ls=ls):
                states = _new_state(params, device)

                def fn():
                    for p, g, s in zip(params, grads, states):
                        lomo_optim_adalomo_update(
                            p, g, s.get("exp_avg_sq_row"), s.get("exp_avg_sq_col"),
                            s.get("exp_avg_sq"), lr=LR, step_num=STEP, loss_scale=ls)
                return fn, lambda: states

            note = ("loss_scale 1.0 (fp32: lomo-optim divides the gradient in place)"
                    if dtype == torch.float32 else "")
            out.append(microbench.Candidate(name, kind, setup, note))
        else:  # adafactor_foreach / adafactor_single
            if not has_adafactor():
                out.append(microbench.Candidate(
                    name, kind, None, f"torch.optim.Adafactor does not exist in torch "
                    f"{torch.__version__}"))
                continue

            def setup(foreach=name == "adafactor_foreach"):
                for p, g in zip(params, grads):
                    p.grad = g
                opt = torch.optim.Adafactor(params, lr=LR, foreach=foreach)
                return opt.step, lambda: list(opt.state.values())

            out.append(microbench.Candidate(name, kind, setup, "no loss scaling"))
    return out


def grad_std(dtype) -> float:
    """Stored gradients are loss-scaled (2**10): about 1e-3 * 2**10."""
    return 1.0


def n_measurements(device, dtypes, shapes, backends=None) -> int:
    return microbench.n_measurements(sys.modules[__name__], device, dtypes, shapes, backends)


def same_bytes_stream(params, grads):
    """The reference of the bandwidth fraction: AdaLomo's passes (2-d: read g and p; read g;
    read g and p, write p), on their own state for 0-d / 1-d parameters (bench/same_bytes.py)."""
    return same_bytes.stream_fn(OP, params, grads, _new_state(params, params[0].device))


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
