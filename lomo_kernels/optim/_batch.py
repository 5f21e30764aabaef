"""What an in-backward optimizer keeps per device, and the small parameters it updates together.

* **Workspace**: one float32 tensor per device, allocated when parameters are attached and sized by
  ``ops.workspace_numel`` over every parameter on that device (the single-tensor op for each, the
  multi-tensor op for each batch), then passed to every update there, so that the kernels
  allocate and clear nothing per call.
* **Gradient-norm accumulator**: ``SLOTS`` float32 elements per device, zeroed when an updating
  backward starts. Every update adds ``sum((g / loss_scale)**2)`` of its parameter to one slot
  (the ops' ``grad_sq``): slot 0 for the parameters updated in their hook, ``1 + dtype index`` for
  the small parameters, batched or not. The small ones therefore add to their own slot in the same
  order whether they are batched or not, and the step's norm is bitwise the same either way.
* **Pending small parameters**: with batching on, a small parameter's hook keeps its gradient
  here; at the end of the backward the optimizer updates each (device, dtype) batch with ONE call
  of the multi-tensor op (one launch on GPU instead of one or more per parameter):
  ``BatchingMixin._update_pending``.

Attributes of the optimizer owned here: ``_pending``, ``_small`` (the parameters ``_is_small``
says are small).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .. import ops, reference
from ._failures import state_restored_on_error
from ._norm import fp32_norm

SMALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SLOTS = 1 + len(SMALL_DTYPES)  # [updated in the hook, small fp32, small fp16, small bf16]
#: Lomo batches every parameter of at most this many elements (and every 0-d / 1-d parameter);
#: AdaLomo's multi-tensor op takes unfactored (0-d / 1-d) parameters only.
SMALL_NUMEL = 65536


def slot_of(p: torch.Tensor, small: bool) -> int:
    return 1 + SMALL_DTYPES.index(p.dtype) if small else 0


class DeviceBuffers:
    """The workspace and the gradient-norm accumulator of each device (see the module doc)."""

    def __init__(self) -> None:
        self.workspace: Dict[torch.device, torch.Tensor] = {}
        self.grad_sq: Dict[torch.device, torch.Tensor] = {}
        self._views: Dict[Tuple[torch.device, int], torch.Tensor] = {}

    def ensure(self, device: torch.device, workspace_numel: int) -> None:
        """Create the accumulator of ``device`` and a workspace of at least ``workspace_numel``
        elements (zero-filled, as the ops require; kept when it is already large enough)."""
        if device not in self.grad_sq:
            acc = self.grad_sq[device] = torch.zeros(SLOTS, dtype=torch.float32, device=device)
            for slot in range(SLOTS):
                self._views[(device, slot)] = acc[slot:slot + 1]
        old = self.workspace.get(device)
        if workspace_numel > 0 and (old is None or old.numel() < workspace_numel):
            self.workspace[device] = torch.zeros(workspace_numel, dtype=torch.float32,
                                                 device=device)

    def accumulator(self, device: torch.device, slot: int) -> torch.Tensor:
        """The 1-element view an update adds its squared gradient norm to."""
        return self._views[(device, slot)]

    def zero_grad_sq(self) -> None:
        for acc in self.grad_sq.values():
            acc.zero_()

    def total_grad_sq(self, device: torch.device) -> torch.Tensor:
        """The sum over devices (in the order they were attached) and slots, a 0-d tensor on
        ``device``. No host synchronisation."""
        parts = [acc.to(device, non_blocking=True) for acc in self.grad_sq.values()]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).sum()


class Pending:
    """Small parameters whose update waits for the end of the backward, with their gradients,
    grouped by (device, dtype) in the order their hooks fired."""

    def __init__(self) -> None:
        self._groups: Dict[Tuple[torch.device, torch.dtype], Tuple[list, list]] = {}

    def add(self, p: torch.Tensor, g: torch.Tensor) -> None:
        params, grads = self._groups.setdefault((p.device, p.dtype), ([], []))
        params.append(p)
        grads.append(g)

    def take(self) -> List[Tuple[torch.device, List[torch.Tensor], List[torch.Tensor]]]:
        """Every batch (device, params, grads), emptying the queue."""
        out = [(dev, params, grads) for (dev, _), (params, grads) in self._groups.items()]
        self._groups = {}
        return out

    def params(self) -> List[torch.Tensor]:
        return [p for params, _ in self._groups.values() for p in params]

    def grad_bytes(self) -> int:
        """Bytes of the gradients kept (the memory batching costs, at its peak: the end of the
        backward)."""
        return sum(g.numel() * g.element_size() for _, grads in self._groups.values()
                   for g in grads)

    def __len__(self) -> int:
        return sum(len(params) for params, _ in self._groups.values())


def workspace_numel(single_op: str, multi_op: str, backend: str, device: torch.device,
                    shapes: Iterable[Tuple[int, ...]],
                    batches: Iterable[List[Tuple[int, ...]]]) -> int:
    """float32 elements of one workspace that serves ``single_op`` on any of ``shapes`` and
    ``multi_op`` on each of ``batches`` (0 for ops other than LOMO's and AdaLomo's: an optimizer
    with other kernels sizes its own)."""
    need = 0
    shapes = [tuple(s) for s in shapes]
    if single_op in ops.SINGLE_OF.values() and shapes:
        need = ops.workspace_numel(single_op, shapes, backend=backend, device=device)
    if multi_op in ops.SINGLE_OF:
        for batch in batches:
            if batch:
                need = max(need, ops.workspace_numel(multi_op, batch, backend=backend,
                                                     device=device))
    return need


def _probe_args(op: str, device: torch.device, acc: torch.Tensor) -> Optional[tuple]:
    p, g = torch.zeros(1, device=device), torch.zeros(1, device=device)
    if op == "lomo_update_":
        return (p, g, None, None, 0.0, 0.0, 1.0, 0.0, "nearest", 0, 1, acc, None)
    if op == "adalomo_update_":
        v = torch.ones(1, device=device)
        return (p, g, None, None, v, None, None, 0.0, 0.0, 1.0, 0.0, 0.0, 1e-30, 1e-3, 1.0,
                "nearest", 0, 1, acc, None)
    return None


def kernel_adds_grad_sq(op: str, backend: str, impl, device: torch.device) -> bool:
    """Whether ``impl`` (``op`` resolved to ``backend`` on ``device``) adds the squared gradient
    norm itself (contract v2's ``grad_sq``). A backend built before it did raises "grad_sq is not
    implemented" when given one: the optimizer then adds it with ``add_grad_sq`` (one more read of
    the gradient). Found once per device, by one call on a 1-element tensor."""
    if backend == "torch":
        return op in ("lomo_update_", "adalomo_update_")
    acc = torch.zeros(1, device=device)
    args = _probe_args(op, device, acc)
    if args is None:
        return False
    try:
        impl(*args)
    except (NotImplementedError, RuntimeError) as exc:
        if "grad_sq" in str(exc) and "not implemented" in str(exc):
            return False
        raise
    return True


def add_grad_sq(acc: torch.Tensor, g: torch.Tensor, loss_scale: float) -> None:
    """``acc += sum((g / loss_scale)**2)`` with torch operations, for kernels that cannot:
    ``_norm.fp32_norm`` (no temporary of ``g``'s size), on the device, no host sync."""
    n = fp32_norm(g)
    if loss_scale != 1.0:
        n = n / reference.f32(loss_scale)
    acc.add_(n.square())


def host_look(values: List[torch.Tensor]) -> Optional[List[float]]:
    """THE host synchronisation of a step: every value (1-element or 0-d device tensors) in one
    transfer. None on the meta device (shape-only dry runs have no values)."""
    if not values:
        return []
    device = values[0].device
    out = torch.cat([v.reshape(1).to(device, non_blocking=True) for v in values])
    return None if device.type == "meta" else out.tolist()


class BatchingMixin:
    """The small parameters of ``InBackwardOptimizer``, updated together at the end of the
    backward (see the module doc)."""

    def _init_batching(self) -> None:
        self._pending = Pending()  # small parameters waiting for the end of the backward
        self._small: set = set()  # the parameters _is_small() says are small

    def _update_pending(self) -> None:
        """The end of an updating backward: each (device, dtype) batch of small parameters in one
        multi-tensor call, in the order their hooks fired. A failure restores the batch's state
        entries, leaves the batches after it unchanged and frees every gradient."""
        batches = self._pending.take()
        for i, (dev, params, grads) in enumerate(batches):
            try:
                with state_restored_on_error(self.state, params) as states, torch.no_grad():
                    self._update_multi(
                        [p.data for p in params], grads,
                        [self.param_groups[self._where[p][0]] for p in params], states,
                        [self._param_seed(p) for p in params])
                    if not self._sq_in_kernel[dev]:
                        acc = self._accumulator(params[0])
                        for g in grads:
                            add_grad_sq(acc, g, self._active_scale)
            except BaseException as exc:
                error = self._batch_failure(exc, params, [p for _, ps, _ in batches[i + 1:]
                                                          for p in ps])
                if error is exc:
                    raise
                raise error from exc
            self._n_updated += len(params)
