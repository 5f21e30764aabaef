"""Kernels checked against the reference on the user's machine.

First use (``ops.get_impl``): the first time a native or Triton kernel of a single-tensor op runs
for an (op, dtype, device) in a process (golore_update_: the dtype of ``r``), it first runs on small tensors (a few thousand elements: vector paths and
scalar tails, both roundings; milliseconds on a GPU) next to the reference on the same device. On a
disagreement beyond docs/spec.md's tolerances, a ``SelfCheckWarning`` says so loudly, the backend is
disabled on that device for the rest of the process (``auto`` skips it, an explicit request is
refused with the reason) and the call, and every later one, goes to the next backend of ``auto``'s
order (ultimately the reference).

``LOMO_KERNELS_SELF_CHECK``: unset or ``1`` checks on CUDA devices, ``0`` turns the check off,
``all`` checks on every device (CPU too: for tests and debugging). ``python -m lomo_kernels`` runs
the same comparison over more shapes for every backend and device (lomo_kernels/doctor.py).
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass

import torch

from . import backends, reference
from ._ops import SINGLE_OF, adalomo_state_shapes

CHECKED_BACKENDS = ("native", "triton", "cuda_emulated")
ROUNDINGS_OF = {torch.float32: ("nearest",), torch.float16: ("nearest", "stochastic"),
                torch.bfloat16: ("nearest", "stochastic")}
# Small shapes with 16-byte vector paths, scalar tails, several tiles and a batched slice.
FIRST_USE_SHAPES = {
    "lomo_update_": [(4133,), (33, 264)],
    "adalomo_update_": [(4133,), (33, 264), (2, 9, 40)],
    "golore_update_": [(4133,)],  # element-wise: one shape covers the grid-stride loop and its tail
}
# Large steps, so that every element moves by many ulps and an element a kernel skips cannot hide
# inside the 1-ulp tolerance; every preprocessing step on (loss scale, value clip, clip_coef).
LOMO_H = dict(lr=0.5, wd=0.1, ls=1024.0, cgv=0.7, coef=0.37)
ADALOMO_H = dict(lr=0.2, wd=0.1, ls=4.0, cgv=0.02, coef=0.7, beta=0.3, eps1=1e-30, eps2=1e-3,
                 thr=0.5)
# GoLore: the full-rank AdamW update (param in every dtype; the projected mode runs the same loop
# body in float32), so the parameter and the state are both compared.
GOLORE_H = dict(lr=0.05, wd=0.1, scale=0.7, b1=0.9, b2=0.999, eps=1e-8, coef=0.8)


class SelfCheckWarning(RuntimeWarning):
    """A kernel disagreed with the reference on this machine; its backend is disabled."""


_lock = threading.Lock()
_results: dict[tuple, "Verdict"] = {}  # (op, backend, device, dtype) -> verdict


def mode() -> str:
    value = os.environ.get("LOMO_KERNELS_SELF_CHECK", "1")
    if value not in ("0", "1", "all"):
        raise ValueError(f"LOMO_KERNELS_SELF_CHECK must be 0, 1 or all, got {value!r}")
    return value


# (backend, device) -> why it is disabled for this process; kept by lomo_kernels.backends, which
# resolution consults
disabled_reason = backends.disabled_reason


def reset() -> None:
    """Forget every verdict and re-enable every backend (tests)."""
    with _lock:
        _results.clear()
        backends.enable_all()


# ---------------------------------------------------------------------------------------------
# One case: the kernel and the reference on the same inputs, compared
# ---------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    ok: bool
    max_ulp: int  # fp16/bf16: the largest distance to the reference in units in the last place
    detail: str  # what disagreed ("" when ok)


def _inputs(op, shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen).to(dtype).to(device)
    scale = {"adalomo_update_": 0.05, "golore_update_": 0.1}.get(op, 1000.0)
    g = (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)
    if op == "adalomo_update_":
        shapes = adalomo_state_shapes(shape)
    elif op == "golore_update_":
        shapes = {"exp_avg": shape, "exp_avg_sq": shape}
    else:
        shapes = {}
    state = {k: (torch.rand(s, generator=gen) * 1e-4 + 1e-6).to(device) for k, s in shapes.items()}
    return p, g, state


def _call(op, impl, p, g, state, rounding, device):
    found = torch.zeros(1, device=device)
    if op == "lomo_update_":
        h = LOMO_H
        impl(p, g, torch.tensor(h["coef"], device=device), found, h["lr"], h["wd"], h["ls"],
             h["cgv"], rounding, 11, 3)
    elif op == "golore_update_":
        h = GOLORE_H
        impl(g, p, state["exp_avg"], state["exp_avg_sq"], None,
             torch.tensor(h["coef"], device=device), found, "adamw", h["lr"], h["wd"], h["scale"],
             h["b1"], h["b2"], h["eps"], 0.0, rounding, 7, 3)
    else:
        h = ADALOMO_H
        impl(p, g, state.get("exp_avg_sq_row"), state.get("exp_avg_sq_col"), state.get("exp_avg_sq"),
             torch.tensor(h["coef"], device=device), found, h["lr"], h["wd"], h["ls"], h["cgv"],
             h["beta"], h["eps1"], h["eps2"], h["thr"], rounding, 5, 2)
    return found


def _ulp(a, b):
    def line(x):  # sign-magnitude bit pattern -> monotonic integer line
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (line(a) - line(b)).abs()


def compare(out, ref, p0, rounding) -> Verdict:
    """docs/spec.md's tolerances against the reference: fp32 within 1e-4 of the size of the terms
    (the reference's own fp32 reductions are ~2e-5 off), fp16/bf16 within 1 ulp except where the
    update cancels the parameter to far below its size; stochastic rounding the reference's bits
    for all but a few elements (fp32 values a few ulps apart meeting a random threshold)."""
    out, ref, p0 = out.cpu(), ref.cpu(), p0.cpu()
    size = p0.double().abs() + ref.double().abs()
    diff = (out.double() - ref.double()).abs()
    if not torch.isfinite(out).all():
        return Verdict(False, -1, "non-finite values")
    if out.dtype == torch.float32:
        bad = diff > 1e-4 * size + 1e-30
        max_ulp = 0
    else:
        ulp = _ulp(out, ref)
        cancelled = diff <= 1e-4 * size
        bad = (ulp > 1) & ~cancelled
        # reported: the worst where the result did not cancel to far below its terms
        kept = ulp[ref.double().abs() >= 1e-2 * size]
        max_ulp = int(kept.max().item()) if kept.numel() else 0
        if rounding == "stochastic":
            same = (out.view(torch.int16) == ref.view(torch.int16)).float().mean().item()
            if same < 0.995:
                return Verdict(False, max_ulp, f"only {same:.1%} of the elements equal")
    n_bad = int(bad.sum().item())
    if n_bad:
        i = int(bad.view(-1).nonzero()[0].item())
        return Verdict(False, max_ulp, f"{n_bad} elements differ (element {i}: "
                                       f"{out.view(-1)[i].item():.6g} vs {ref.view(-1)[i].item():.6g})")
    return Verdict(True, max_ulp, "")


def run_case(op, impl, shape, dtype, rounding, device, seed=0, cache=None) -> Verdict:
    """``impl`` (a kernel with the op's schema) and the reference on one shape, compared. ``cache``
    (a dict) keeps the reference's results for the next kernel checked on the same case."""
    p, g, state = _inputs(op, shape, dtype, device, seed)
    out, out_state = p.clone(), {k: v.clone() for k, v in state.items()}
    try:
        found = _call(op, impl, out, g, out_state, rounding, device)
    except Exception as exc:  # a kernel that raises disagrees too
        return Verdict(False, -1, f"raised {type(exc).__name__}: {exc}")
    key = (op, tuple(shape), dtype, rounding, str(device), seed)
    if cache is not None and key in cache:
        ref, ref_state = cache[key]
    else:
        ref, ref_state = p.clone(), {k: v.clone() for k, v in state.items()}
        _call(op, getattr(reference, op), ref, g, ref_state, rounding, device)
        if cache is not None:
            cache[key] = ref, ref_state
    if found.item() != 0.0:
        return Verdict(False, -1, "found_inf set for finite gradients")
    verdict = compare(out, ref, p, rounding)
    for k in ref_state:
        a, b = out_state[k].cpu(), ref_state[k].cpu()
        if not ((a - b).abs() <= 1e-5 * b.abs()).all():
            return Verdict(False, verdict.max_ulp, f"state {k} differs")
    if verdict.ok and p.numel() > 100 and torch.equal(out, p):
        return Verdict(False, 0, "the parameter was not updated")
    return verdict


def check_kernel(op, impl, dtype, device, shapes=None) -> Verdict:
    worst = 0
    for rounding in ROUNDINGS_OF[dtype]:
        for shape in shapes or FIRST_USE_SHAPES[op]:
            v = run_case(op, impl, shape, dtype, rounding, device)
            if not v.ok:
                return Verdict(False, v.max_ulp,
                               f"{op} {str(dtype).replace('torch.', '')} {rounding} "
                               f"{tuple(shape)}: {v.detail}")
            worst = max(worst, v.max_ulp)
    return Verdict(True, worst, "")


# ---------------------------------------------------------------------------------------------
# First use
# ---------------------------------------------------------------------------------------------


def _applies(backend: str, device: torch.device) -> bool:
    m = mode()
    return backend in CHECKED_BACKENDS and (m == "all" or (m == "1" and device.type == "cuda"))


def guard(op: str, backend: str, device: torch.device, impl, fallback):
    """``impl``, or a wrapper that checks it at its first use per dtype (see the module doc).
    ``fallback(device)``: the implementation that runs instead when the check fails (ops.get_impl
    of "auto", which then skips the disabled backend)."""
    if not _applies(backend, device):
        return impl
    if op in FIRST_USE_SHAPES:
        return _Checked(op, backend, device, impl, fallback)
    if op in SINGLE_OF:
        return _CheckedMulti(op, backend, device, impl, fallback)
    return impl


class _Checked:
    __slots__ = ("op", "backend", "device", "impl", "resolve_fallback", "fallback")

    def __init__(self, op, backend, device, impl, resolve_fallback):
        self.op, self.backend, self.device, self.impl = op, backend, device, impl
        self.resolve_fallback, self.fallback = resolve_fallback, None

    def __call__(self, param, grad, *args, **kwargs):
        verdict = _results.get((self.op, self.backend, str(param.device), param.dtype))
        if verdict is None and disabled_reason(self.backend, param.device) is None:
            if param.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return self.impl(param, grad, *args, **kwargs)  # no sync while capturing
            verdict = _first_use(self.op, self.backend, param.device, param.dtype, self.impl)
        if verdict is not None and verdict.ok:
            return self.impl(param, grad, *args, **kwargs)
        if self.fallback is None:
            self.fallback = self.resolve_fallback(param.device)
        return self.fallback(param, grad, *args, **kwargs)


class _CheckedMulti:
    """A multi-tensor op: runs when the backend's single-tensor kernel passed its first-use check
    for every dtype of the list (the multi kernel updates each tensor bitwise as the single one),
    else on ``auto``'s choice."""

    __slots__ = ("op", "single", "backend", "device", "impl", "resolve_fallback", "fallback")

    def __init__(self, op, backend, device, impl, resolve_fallback):
        self.op, self.single, self.backend = op, SINGLE_OF[op], backend
        self.device, self.impl, self.fallback = device, impl, None
        self.resolve_fallback = resolve_fallback

    def _ok(self, dtype) -> bool:
        verdict = _results.get((self.single, self.backend, str(self.device), dtype))
        if verdict is None and disabled_reason(self.backend, self.device) is None:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return True
            raw = backends.raw_impl(self.single, self.backend, self.device)
            verdict = _first_use(self.single, self.backend, self.device, dtype, raw)
        return verdict is not None and verdict.ok

    def __call__(self, params, *args, **kwargs):
        if all(self._ok(dt) for dt in {p.dtype for p in params}):
            return self.impl(params, *args, **kwargs)
        if self.fallback is None:
            self.fallback = self.resolve_fallback(self.device)
        return self.fallback(params, *args, **kwargs)


def _first_use(op, backend, device, dtype, impl) -> Verdict:
    key = (op, backend, str(device), dtype)
    with _lock:
        if key in _results:
            return _results[key]
        verdict = check_kernel(op, impl, dtype, device)
        _results[key] = verdict
        if not verdict.ok:
            why = f"its self-check disagreed with the reference ({verdict.detail})"
            backends.disable(backend, device, why)
    if not verdict.ok:
        warnings.warn(
            f"lomo_kernels SELF-CHECK FAILED: the {backend} kernel on {device} disagrees with the "
            f"reference: {verdict.detail}. The {backend} backend is disabled on {device} for this "
            f"process; the update runs on backend {backends.resolve_backend('auto', device)!r} instead. "
            "Please report this with the output of `python -m lomo_kernels` "
            "(LOMO_KERNELS_SELF_CHECK=0 turns the check off).",
            SelfCheckWarning, stacklevel=3)
    return verdict
