"""The accumulation window of an in-backward optimizer (``accumulation_steps=K``): the buffers its
backwards add their gradients into, and what it knows about them, until the window is applied.

Per parameter, allocated at its first gradient and kept across windows: the buffer (the
parameter's shape, or what a subclass accumulates instead, such as GoLore's projected gradient)
and a 1-element float32 slot that the accumulation kernel SETS to the squared norm of the buffer
(``buf_sq``). A parameter's first gradient of a window writes its buffer instead of adding
(``first``), so a buffer is never zeroed; a parameter with no gradient in the window is neither
read nor updated. The window's squared norm is the sum of the slots of the parameters filled in
it, in their ordinal order (FSDP2 shards: summed across the shard group by the caller): the exact
norm of the accumulated gradient, known before the first parameter changes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

#: ``accumulation_dtype`` values: float32 buffers (exact sums), or the parameter's own dtype
#: (bf16/fp16 buffers with stochastic rounding: half the memory; float32 parameters keep float32).
ACCUMULATION_DTYPES = ("float32", "param")
_SALT = 0x5BD1E995  # keys the buffers' rounding apart from the parameters'


def check_accumulation_dtype(value: Any, name: str) -> str:
    """``accumulation_dtype`` as one of ACCUMULATION_DTYPES (``torch.float32`` is "float32")."""
    if value is torch.float32:
        return "float32"
    if not isinstance(value, str) or value not in ACCUMULATION_DTYPES:
        raise ValueError(f"{name} must be torch.float32, 'float32' or 'param' (the parameter's "
                         f"own dtype, stochastic rounding), got {value!r}")
    return value


class WindowFullError(RuntimeError):
    """A backward after ``accumulation_steps`` backwards without ``step()``: refused before it
    changes anything (the window's gradients are kept)."""


class Window:
    """Buffers, slots and the position of the current window (see the module doc)."""

    def __init__(self, steps: int, dtype: str) -> None:
        self.steps = steps
        self.enabled = steps > 1
        self.dtype = dtype
        self.count = 0  # backwards accumulated in this window
        self.index = 0  # windows applied or dropped so far (keys the buffers' rounding)
        self.scaled = False  # a backward of this window was the optimizer's own (loss scaled)
        self.in_backward = 0  # accumulations started by the backward running now
        self.buffers: Dict[torch.Tensor, torch.Tensor] = {}
        self.slots: Dict[torch.Tensor, torch.Tensor] = {}
        self.filled: Dict[torch.Tensor, int] = {}  # param -> window index of its last fill

    # ------------------------------------------------------------------ per gradient
    def buffer_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float32 if self.dtype == "float32" else p.dtype

    def buffer(self, p: torch.Tensor, shape: Tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """(buffer, its slot, first): ``p``'s buffer of ``shape`` and ``dtype`` (allocated at its
        first use, reallocated when they change), and whether this is ``p``'s first gradient of
        the window (the kernel then writes instead of adding)."""
        buf = self.buffers.get(p)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            if p in self.filled and self.filled[p] == self.index:
                raise RuntimeError("an accumulation buffer changed shape inside a window")
            buf = self.buffers[p] = torch.empty(shape, dtype=dtype, device=device)
            self.slots[p] = torch.zeros(1, dtype=torch.float32, device=device)
        return buf, self.slots[p], self.filled.get(p) != self.index

    def mark(self, p: torch.Tensor) -> None:
        """``p``'s buffer holds this window's gradient (after its kernel ran)."""
        self.filled[p] = self.index

    def rounding_of(self, buf: torch.Tensor, param_seed: int) -> Tuple[str, int, int]:
        """(rounding, seed, step) of an accumulation into ``buf``: stochastic for a 16-bit buffer,
        keyed apart from the parameter's own rounding and for every backward of the run."""
        if buf.dtype == torch.float32:
            return "nearest", 0, 0
        return ("stochastic", (param_seed ^ _SALT) & 0xFFFFFFFF,
                self.index * self.steps + self.count)

    # ------------------------------------------------------------------ the window
    def params(self, order: Dict[torch.Tensor, Tuple[int, int]]) -> List[torch.Tensor]:
        """The parameters filled in this window, in ordinal order."""
        mine = [p for p, i in self.filled.items() if i == self.index]
        return sorted(mine, key=lambda p: order[p][1])

    def squared_norm(self, params: List[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Sum of the slots of ``params`` (in that order) as a 0-d float32 tensor on ``device``;
        no host synchronisation."""
        if not params:
            return torch.zeros((), dtype=torch.float32, device=device)
        parts = [self.slots[p].to(device, non_blocking=True) for p in params]
        return torch.cat(parts).sum()

    def close(self) -> int:
        """End the window (applied or dropped): its buffers count as empty from now on. Returns
        how many backwards it held."""
        held = self.count
        self.index += 1
        self.count = 0
        self.scaled = False
        self.in_backward = 0
        return held

    def free(self) -> None:
        """Release every buffer (they are reallocated at the next gradient)."""
        self.buffers.clear()
        self.slots.clear()
        self.filled.clear()

    # ------------------------------------------------------------------ state_dict
    def state(self, ids: Dict[torch.Tensor, int]) -> Optional[Dict[str, Any]]:
        """What a ``state_dict`` saved between two backwards of a window needs to resume it
        bitwise (None at a window boundary: nothing to save)."""
        if self.count == 0:
            return None
        mine = [p for p, i in self.filled.items() if i == self.index]
        return {
            "count": self.count, "index": self.index, "scaled": self.scaled,
            "buffers": {ids[p]: self.buffers[p].detach().cpu().clone() for p in mine},
            "slots": {ids[p]: self.slots[p].detach().cpu().clone() for p in mine},
        }

    def load(self, saved: Optional[Dict[str, Any]], params: Dict[int, torch.Tensor]) -> None:
        """Restore a window saved by ``state`` (None: start at a boundary; what this window held
        is dropped)."""
        if self.count or any(i == self.index for i in self.filled.values()):
            self.close()
        if saved is None:
            return
        self.index = int(saved["index"])
        self.count = int(saved["count"])
        self.scaled = bool(saved["scaled"])
        for pid, buf in saved["buffers"].items():
            p = params[pid]
            self.buffers[p] = buf.to(p.device, copy=True)
            self.slots[p] = saved["slots"][pid].to(p.device, copy=True)
            self.filled[p] = self.index


def add_note(exc: BaseException, note: str) -> None:
    """Append ``note`` to ``exc``'s message where Python supports notes (3.11+)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)


__all__ = ["Window", "WindowFullError", "ACCUMULATION_DTYPES", "check_accumulation_dtype",
           "add_note"]
