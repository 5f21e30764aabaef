"""The kernels an optimizer runs on each device, the buffers they share, and one parameter's update
through them.

Per device, resolved or allocated when parameters are attached, never per update: the backend
``backend="auto"`` means there, the op implementations (``ops.get_impl``, once), one float32
workspace large enough for every update there (_batch.DeviceBuffers) and the gradient-norm
accumulator whose slot each update adds ``sum((g / loss_scale)**2)`` to; and, once, whether the
device's kernel adds that itself (else the base adds it with one torch reduction of ``g``).

Attributes owned here: ``_backends``, ``_impls``, ``_multi_impls``, ``_buffers``,
``_sq_in_kernel``, ``_updating_shard``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch

from .. import ops
from . import _batch, _distributed
from ._failures import state_restored_on_error

_GOLDEN32 = 0x9E3779B9


class KernelsMixin:
    """Per-device kernels and buffers of ``InBackwardOptimizer``, and ``_update_param``."""

    def _init_kernels(self) -> None:
        self._backends: Dict[torch.device, str] = {}  # device -> resolved backend name
        self._impls: Dict[Any, Callable] = {}  # device -> op implementation
        self._multi_impls: Dict[torch.device, Callable] = {}  # device -> multi-tensor op
        self._buffers = _batch.DeviceBuffers()  # device -> workspace, grad_sq accumulator
        self._sq_in_kernel: Dict[torch.device, bool] = {}  # device -> the kernel adds grad_sq
        self._updating_shard = False  # inside _update_sharded (its norm is added by the base)

    def _resolve_backend(self, device: torch.device, pname: str) -> str:
        b = self._backends.get(device)
        if b is None:
            try:
                b = ops.resolve_backend(self.backend, device)
            except RuntimeError as exc:
                msg = str(exc).removeprefix("lomo_kernels: ")
                raise RuntimeError(f"{self._name}: parameter {pname}: {msg}") from None
            self._backends[device] = b
        return b

    def _check_param(self, p: torch.Tensor, pname: str) -> None:
        if p.dtype not in ops.SUPPORTED_DTYPES:
            raise TypeError(f"{self._name}: parameter {pname} has dtype {p.dtype}; only float32, "
                            "float16 and bfloat16 parameters are supported")
        if not p.is_contiguous():
            raise ValueError(f"{self._name}: parameter {pname} is not contiguous "
                             "(call .contiguous() on its data before creating the optimizer)")
        self._resolve_backend(p.device, pname)

    def _impl(self, device: torch.device) -> Callable:
        impl = self._impls.get(device)
        if impl is None:
            impl = self._impls[device] = ops.get_impl(self._op, self.backend, device)
            if self._multi_op:  # resolved together: a failed first-use self-check of the single
                self._multi_impl(device)  # kernel must not make the later resolution refuse
        return impl

    def _multi_impl(self, device: torch.device) -> Callable:
        impl = self._multi_impls.get(device)
        if impl is None:
            impl = self._multi_impls[device] = ops.get_impl(self._multi_op, self.backend, device)
        return impl

    def _prepare_devices(self, params: List[torch.Tensor], small: set) -> None:
        """Per device of ``params`` (every parameter this optimizer will update; ``small``: those
        batched): the gradient-norm accumulator, and one workspace large enough for every update
        there (grown when parameters are added, never per call); and, once, whether the device's
        kernel adds the squared gradient norm itself."""
        by_device: Dict[torch.device, List[torch.Tensor]] = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p)
        for dev, params in by_device.items():
            batches: Dict[torch.dtype, list] = {}
            for p in params:
                if p in small:
                    batches.setdefault(p.dtype, []).append(tuple(p.shape))
            need = self._workspace_numel(dev, params, list(batches.values()))
            accumulate = self._accumulate_workspace_numel(dev, [tuple(p.shape) for p in params])
            self._buffers.ensure(dev, max(need, accumulate))
            if dev not in self._sq_in_kernel:
                self._sq_in_kernel[dev] = self._kernel_adds_grad_sq(dev)

    def _workspace_numel(self, device: torch.device, params: List[torch.Tensor],
                         batches: List[list]) -> int:
        """float32 elements of ``device``'s workspace (subclasses with other ops override)."""
        return _batch.workspace_numel(self._op, self._multi_op, self._backends[device], device,
                                      [tuple(p.shape) for p in params], batches)

    def _kernel_adds_grad_sq(self, device: torch.device) -> bool:
        """Whether ``_update``'s kernel on ``device`` adds ``grad_sq`` itself; when not, the base
        adds it after ``_update`` with one torch reduction of the gradient."""
        if self._op not in ops.SINGLE_OF.values():
            return False
        return _batch.kernel_adds_grad_sq(self._op, self._backends[device], self._impl(device),
                                          device)

    def _accumulator(self, p: torch.Tensor) -> torch.Tensor:
        """The 1-element float32 slot ``p``'s squared gradient norm is added to (``p`` or its
        ``.data``: the slot depends on device, dtype and size only)."""
        small = self._multi_op != "" and self._is_small(p)
        return self._buffers.accumulator(p.device, _batch.slot_of(p, small))

    def _grad_sq(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """``grad_sq`` for the kernel updating ``p``: its accumulator slot, or None when that
        kernel cannot add it (the base then does)."""
        if self._updating_shard:
            return None
        return self._accumulator(p) if self._sq_in_kernel[p.device] else None

    def _workspace(self, device: torch.device) -> Optional[torch.Tensor]:
        """The workspace every update on ``device`` uses (None when the ops need none)."""
        return self._buffers.workspace.get(device)

    def _param_seed(self, p: torch.Tensor) -> int:
        return (self.seed + _GOLDEN32 * self._where[p][1]) & 0xFFFFFFFF

    def _update_param(self, p: torch.Tensor, g: torch.Tensor, shard: Optional[Any]) -> None:
        """``p``'s update from its gradient ``g`` (``shard``: its FSDP2 shard, else None) and its
        part of the step's squared norm; on an error its state entries are restored."""
        group = self.param_groups[self._where[p][0]]
        with state_restored_on_error(self.state, [p]) as (state,), torch.no_grad():
            if shard is None:
                self._update(p.data, g, group, state, self._param_seed(p))
                if not self._sq_in_kernel[p.device]:
                    _batch.add_grad_sq(self._accumulator(p), g, self._active_scale)
            else:
                # the kernels add no grad_sq here (_grad_sq is None): the local shard's part of
                # the norm goes to the sharded accumulator, summed across ranks by
                # _reduce_grad_sq (one torch reduction of the shard), before the update
                # (GoLore's may reuse the gradient's buffer)
                _batch.add_grad_sq(self._sharding.grad_sq(g.device), g, self._active_scale)
                self._updating_shard = True
                try:
                    self._update_sharded(_distributed.local(p), g, group, state,
                                         _distributed.shard_seed(self._param_seed(p), shard),
                                         shard)
                finally:
                    self._updating_shard = False
        self._stamp[p] = self._token
        self._n_updated += 1
