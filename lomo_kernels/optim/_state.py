"""An in-backward optimizer's ``repr``, ``state_dict`` and ``load_state_dict``.

``state_dict`` is torch's, with a ``"lomo_kernels"`` entry for what lives outside the param
groups (seed, clipping, the skip of an overflowed step, the loss scaler, and, saved between two
backwards of an accumulation window, the window: its buffers and position, so that a resumed run
continues it bitwise). ``load_state_dict``
checks every saved group before anything changes, and restores the state tensors as they were
saved (torch would cast floating state to the parameter's dtype; AdaLomo's factors stay float32).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .loss_scaler import DynamicLossScaler


class StateMixin:
    """``__repr__``, ``state_dict`` and ``load_state_dict`` of ``InBackwardOptimizer``."""

    def __repr__(self) -> str:
        backend = repr(self.backend)
        if self._backends:
            backend += " (" + ", ".join(f"{d}: {b}" for d, b in self._backends.items()) + ")"
        parts = [f"backend={backend}", f"rounding={self.rounding!r}"]
        groups = getattr(self, "param_groups", [])
        for key in self.defaults:
            values = [g.get(key) for g in groups]
            shown = values[0] if values and all(v == values[0] for v in values) else values
            parts.append(f"{key}={shown!r}")
        parts += [f"{k}={v!r}" for k, v in self._repr_extra().items()]
        if self.seed:
            parts.append(f"seed={self.seed}")
        parts.append(f"parameters={len(self._where)}")
        if len(groups) > 1:
            parts.append(f"param_groups={len(groups)}")
        if self._detached is not None:
            parts.append(f"detached={self._detached!r}")
        return f"{self._name}({', '.join(parts)})"

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["lomo_kernels"] = {
            "seed": self.seed,
            "clip_grad_norm": self.clip_grad_norm,
            "clip_coef": None if self.clip_coef is None else self.clip_coef.detach().cpu().clone(),
            "skip_next": self._skip_next,
            "loss_scaler": None if self.loss_scaler is None else self.loss_scaler.state_dict(),
            "accumulation": self._window_state(),
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            got = (f"a dict with keys {sorted(map(str, state_dict))}"
                   if isinstance(state_dict, dict) else type(state_dict).__name__)
            raise TypeError(f"{self._name}: load_state_dict takes the dict that "
                            f"optimizer.state_dict() returns ('state', 'param_groups', ...), "
                            f"got {got}")
        state_dict = dict(state_dict)
        for i, group in enumerate(state_dict.get("param_groups", ())):
            self._check_group(group, f"state_dict param_groups[{i}]")  # before anything changes
        extra = state_dict.pop("lomo_kernels", None)
        saved_window = None if extra is None else extra.get("accumulation")
        self._check_window_state(saved_window)  # before anything changes
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
        self._load_window_state(saved_window)
