"""The machinery Lomo and AdaLomo share: in-backward updates from post-accumulate-grad hooks.

One ``register_post_accumulate_grad_hook`` per trainable parameter. The hook fires once, after
every contribution to the parameter's gradient has been summed (so tied weights see their full
gradient), runs the fused update op in place and frees the gradient (``p.grad = None``). A hook
does O(1) work and never synchronises with the host: per-step scalars (clip coefficient, overflow
flag) are device tensors.

A backward runs in one of three modes: ``update`` (the default: ``fused_backward`` or a plain
``loss.backward()``), ``norm`` (``grad_norm``: gather the gradient norms, change nothing) and
``skip`` (an overflow was found by ``grad_norm``: drop the gradients, change nothing).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.optim import Optimizer

from .. import ops
from ._norm import fp32_norm
from .loss_scaler import DynamicLossScaler

_GOLDEN32 = 0x9E3779B9


class NonFiniteGradientWarning(RuntimeWarning):
    """A backward produced NaN/Inf gradients; the affected values were left unchanged."""


def _current_task_id() -> int:
    return torch._C._current_graph_task_id()


class InBackwardOptimizer(Optimizer):
    """Base class: subclasses set ``_name`` and implement ``_update(p, g, group, state, ...)``."""

    _name = "InBackwardOptimizer"

    def __init__(self, model, defaults, *, clip_grad_norm, backend, rounding, seed):
        if backend not in ops.BACKENDS:
            raise ValueError(f"{self._name}: backend must be one of {ops.BACKENDS}, got {backend!r}")
        if rounding not in ops.ROUNDINGS:
            raise ValueError(f"{self._name}: rounding must be one of {ops.ROUNDINGS}, got {rounding!r}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm should be positive, got {clip_grad_norm}.")
        if defaults["lr"] < 0:
            raise ValueError(f"{self._name}: lr must be >= 0, got {defaults['lr']}")
        if defaults.get("weight_decay", 0.0) < 0:
            raise ValueError(f"{self._name}: weight_decay must be >= 0, got {defaults['weight_decay']}")
        if isinstance(model, torch.nn.Module):
            self.model = model
            self._names = {p: n for n, p in model.named_parameters()}
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            self.model = None
            self._names = {}
            params = model
        self.backend = backend
        self.rounding = rounding
        self.seed = int(seed)
        self.clip_grad_norm = clip_grad_norm
        self.clip_coef = None  # 0-d float32 device tensor after grad_norm()
        self.loss_scaler = None  # DynamicLossScaler for fp16 LOMO
        self._mode = "update"
        self._in_fused = False
        self._active_scale = 1.0  # the loss scale of the backward running now
        self._skip_next = False
        self._active_tasks = set()  # autograd graph tasks running that our hooks have seen
        self._token = 0  # the step number, advanced by step() and fused_backward()
        self._stamp = {}  # param -> token of its last update (catches a second gradient)
        self._grad_norms = []
        self._found_inf = {}  # device -> 1-element float32 flag
        self._clip_coefs = {}  # device -> clip_coef on that device
        self._impls = {}  # device -> resolved op implementation
        self._where = {}  # param -> (group index, ordinal)
        self._hook_handles = []
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ parameters and hooks
    def _pname(self, p) -> str:
        return self._names.get(p, f"#{self._where[p][1] if p in self._where else '?'}")

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        for key in ("lr", "weight_decay"):
            if group.get(key, 0.0) < 0:
                raise ValueError(f"{self._name}: {key} must be >= 0, got {group[key]}")
        for p in group["params"]:
            if not p.requires_grad:
                continue  # frozen: ignored
            if p.dtype not in ops.SUPPORTED_DTYPES:
                raise TypeError(
                    f"{self._name}: parameter {self._names.get(p, '')!s} has dtype {p.dtype}; "
                    "only float32, float16 and bfloat16 parameters are supported"
                )
            if not p.is_contiguous():
                raise ValueError(f"{self._name}: parameter {self._names.get(p, '')!s} is not contiguous")
            self._where[p] = (gi, len(self._where))
            self._hook_handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def remove_hooks(self) -> None:
        """Detach the optimizer from its parameters (gradients then accumulate as usual)."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()

    def _impl(self, device):
        impl = self._impls.get(device)
        if impl is None:
            impl = self._impls[device] = ops.get_impl(self._op, self.backend, device)
        return impl

    def _device_flag(self, device):
        t = self._found_inf.get(device)
        if t is None:
            t = self._found_inf[device] = torch.zeros(1, dtype=torch.float32, device=device)
        return t

    def _clip_coef_on(self, device):
        if self.clip_coef is None or self.clip_grad_norm is None:
            return None
        t = self._clip_coefs.get(device)
        if t is None:
            t = self._clip_coefs[device] = self.clip_coef.to(device)
        return t

    def _param_seed(self, p) -> int:
        return (self.seed + _GOLDEN32 * self._where[p][1]) & 0xFFFFFFFF

    # ------------------------------------------------------------------ the hook
    def _hook(self, p) -> None:
        tid = _current_task_id()
        if tid not in self._active_tasks:
            self._begin_task(tid)
        g = p.grad
        p.grad = None
        if g is None or self._mode == "skip" or p.numel() == 0:
            return
        if self._mode == "norm":
            n = fp32_norm(g)
            s = self._active_scale
            self._grad_norms.append(n / s if s != 1.0 else n)
            return
        if self._stamp.get(p) == self._token:
            raise RuntimeError(
                f"{self._name}: parameter {self._pname(p)} received a second gradient before "
                "optimizer.step(). The update happens inside backward and frees each gradient, so "
                "gradient accumulation cannot work (set gradient_accumulation_steps=1): call "
                "optimizer.step() (a no-op that marks the step boundary) after every "
                "loss.backward(), or use fused_backward(loss, lr). (A weight shared between "
                "reentrant checkpoint segments also gets its gradient in pieces: use "
                "torch.utils.checkpoint(..., use_reentrant=False).)"
            )
        self._stamp[p] = self._token
        if not g.is_contiguous():
            g = g.contiguous()
        group = self.param_groups[self._where[p][0]]
        with torch.no_grad():
            self._update(p.data, g, group, self.state[p], self._param_seed(p))

    def _begin_task(self, tid) -> None:
        """First hook of a graph task (a backward, or one nested in it by reentrant checkpointing):
        the checks that must pass before anything changes, and the end-of-backward callback."""
        if self._mode == "update":
            self._check_clip(plain=not self._in_fused)
            self._check_before_update()
        self._active_tasks.add(tid)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end_task(tid))

    def _check_before_update(self) -> None:
        for group in self.param_groups:
            if group["lr"] < 0:
                raise ValueError(f"{self._name}: lr must be >= 0, got {group['lr']}")

    def _end_task(self, tid) -> None:
        self._active_tasks.discard(tid)
        if not self._active_tasks and self._mode == "update" and not self._in_fused:
            self._after_update()  # the end of a plain loss.backward()

    def _after_update(self) -> bool:
        """After an updating backward: one look at the device overflow flags. True if clean."""
        flags = [t for t in self._found_inf.values()]
        found = any(bool(t.item()) for t in flags)
        for t in flags:
            t.zero_()
        if found:
            if self.loss_scaler is not None:
                self.loss_scaler.update_scale(overflow=True)
            else:
                warnings.warn(
                    f"{self._name}: NaN/Inf gradients in this backward; the affected values were "
                    "left unchanged (see lomo_kernels README, 'Non-finite gradients')",
                    NonFiniteGradientWarning,
                    stacklevel=3,
                )
        elif self.loss_scaler is not None:
            self.loss_scaler.update_scale(overflow=False)
        return not found

    # ------------------------------------------------------------------ lomo-optim's API
    def _loss_scale(self) -> float:
        return 1.0

    def _prepare(self, loss) -> None:
        """Checks on the loss before a backward (subclasses add fp16 handling)."""
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"{self._name}: loss must be a tensor, got {type(loss).__name__}")
        if not loss.is_floating_point():
            raise TypeError(f"{self._name}: loss must be a floating-point tensor, got {loss.dtype}")
        if loss.numel() != 1:
            raise ValueError(f"{self._name}: loss must be a scalar, got shape {tuple(loss.shape)}")

    def _scaled(self, loss):
        """The loss our backward differentiates; the hooks divide by the same scale. (A plain
        loss.backward() is not scaled, so its hooks divide by nothing.)"""
        s = self._active_scale = self._loss_scale()
        return loss * s if s != 1.0 else loss

    def fused_backward(self, loss, lr=None) -> None:
        """Backward with the update fused into it. ``lr`` (if given) sets every group's lr."""
        self._prepare(loss)
        if lr is not None:
            if lr < 0:
                raise ValueError(f"{self._name}: lr must be >= 0, got {lr}")
            for group in self.param_groups:
                group["lr"] = lr
        skip, self._skip_next = self._skip_next, False
        if not skip:
            self._check_clip(plain=False)
            self._check_before_update()
        self._token += 1
        self._mode = "skip" if skip else "update"
        self._in_fused = True
        try:
            self._scaled(loss).backward()
        finally:
            self._in_fused = False
            self._mode = "update"
            self._active_scale = 1.0
            self._active_tasks.clear()
        if not skip:
            self._after_update()
        self.step()  # marks the step boundary (and tells LR schedulers a step was taken)

    def _check_clip(self, plain: bool) -> None:
        """Lomo requires grad_norm() before an update when clip_grad_norm is set."""

    def grad_norm(self, loss):
        """First of the two backward passes of global-norm clipping (lomo-optim's scheme).

        Computes the L2 norm of all (unscaled) gradients without changing any parameter, sets
        ``clip_coef = min(1, clip_grad_norm / (norm + 1e-6))`` for the following
        ``fused_backward`` and returns the norm (a 0-d tensor). If the norm is not finite the
        following ``fused_backward`` changes nothing (fp16: the loss scale is reduced).
        """
        self._prepare(loss)
        if self.clip_grad_norm is None:
            raise ValueError(f"{self._name}: grad_norm() needs clip_grad_norm to be set")
        self._mode = "norm"
        self._grad_norms = []
        try:
            self._scaled(loss).backward(retain_graph=True)
        finally:
            self._mode = "update"
            self._active_scale = 1.0
            self._active_tasks.clear()
        norms = self._grad_norms
        self._grad_norms = []
        if not norms:
            return torch.zeros((), dtype=torch.float32)
        dev = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(dev) for n in norms]))
        # One host look per step, after the backward: an overflow must skip the next update.
        if not bool(torch.isfinite(total)):
            self._skip_next = True
            if self.loss_scaler is not None:
                self.loss_scaler.update_scale(overflow=True)
            else:
                warnings.warn(
                    f"{self._name}: the gradient norm is {float(total)}; the next fused_backward "
                    "will not change any parameter",
                    NonFiniteGradientWarning,
                    stacklevel=2,
                )
            return total
        self.clip_coef = torch.clamp(float(self.clip_grad_norm) / (total + 1e-6), max=1.0)
        self._clip_coefs = {dev: self.clip_coef}
        return total

    @torch.no_grad()
    def step(self, closure=None):
        """A no-op: the update happened inside backward. Marks the step boundary."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._token += 1
        self._active_tasks.clear()  # step() runs outside any backward
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self):
        sd = super().state_dict()
        sd["lomo_kernels"] = {
            "seed": self.seed,
            "clip_grad_norm": self.clip_grad_norm,
            "clip_coef": None if self.clip_coef is None else self.clip_coef.detach().cpu().clone(),
            "skip_next": self._skip_next,
            "loss_scaler": None if self.loss_scaler is None else self.loss_scaler.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("lomo_kernels", None)
        # torch casts floating state to the parameter dtype; AdaLomo's factors must stay fp32,
        # so the tensors are restored here, as they were saved.
        tensors = {}
        plain = {}
        for pid, s in state_dict["state"].items():
            tensors[pid] = {k: v for k, v in s.items() if torch.is_tensor(v)}
            plain[pid] = {k: v for k, v in s.items() if not torch.is_tensor(v)}
        super().load_state_dict({**state_dict, "state": plain})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_to_param = dict(zip(saved_ids, params))
        for pid, ts in tensors.items():
            p = id_to_param[pid]
            for k, v in ts.items():
                self.state[p][k] = v.detach().to(p.device, copy=True)
        if extra is not None:
            self.seed = extra["seed"]
            self.clip_grad_norm = extra["clip_grad_norm"]
            cc = extra["clip_coef"]
            self.clip_coef = None if cc is None else cc.clone()
            self._clip_coefs = {}
            self._skip_next = extra["skip_next"]
            if extra["loss_scaler"] is not None:
                self.loss_scaler = DynamicLossScaler()
                self.loss_scaler.load_state_dict(extra["loss_scaler"])

    # ------------------------------------------------------------------ helpers for subclasses
    @staticmethod
    def _beta(step: int, decay_rate: float) -> float:
        # lomo-optim: "To avoid math errors for edge cases"
        decay = -decay_rate if (step == 0 and decay_rate < 0) else decay_rate
        return 1.0 - math.pow(step, decay)
