"""What a failed backward leaves behind: nothing but the parameters it had already updated.

Everything that can be checked before the first parameter changes is checked then (_hooks.py's
``_begin_task``, _backward.py). An error at a later parameter (a second gradient, a kernel error)
cannot undo the parameters this backward already updated in place (no copies are kept: that is the
point of updating in place); it leaves that parameter and those not yet reached unchanged,
restores the failing parameter's state entries (``state_restored_on_error``) and says how many
parameters were updated (``_failure``). In every case no ``.grad`` survives, the per-backward
bookkeeping is reset (``_abort_backward``) and the small parameters waiting for the end of the
backward are dropped unchanged (``_drop_pending``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List

import torch

from ._guards import with_note


@contextlib.contextmanager
def state_restored_on_error(state: Dict[torch.Tensor, Dict[str, Any]],
                            params: List[torch.Tensor]) -> Iterator[List[Dict[str, Any]]]:
    """Yields the state entries of ``params`` (created when missing); if the block raises, each is
    put back as it was (entries created by the block are removed) and the error goes on."""
    had = [p in state for p in params]
    entries = [state[p] for p in params]
    saved = [dict(e) for e in entries]
    try:
        yield entries
    except BaseException:
        for p, entry, old, kept in zip(params, entries, saved, had):
            entry.clear()
            entry.update(old)
            if not kept:
                del state[p]
        raise


def current_task_id() -> int:
    return torch._C._current_graph_task_id()


class FailuresMixin:
    """Failure handling of ``InBackwardOptimizer`` (see the module doc)."""

    def _failure(self, exc: Exception, p: torch.Tensor) -> Exception:
        """Reset the per-backward bookkeeping and say what the failed backward changed."""
        n = self._n_updated
        waiting = len(self._pending)
        window = self._window_note(exc) if self._window.enabled else None
        self._abort_backward()
        pname = self._pname(p)
        at = "" if f"parameter {pname} " in str(exc) else f"at parameter {pname}; "
        if window is not None:
            return with_note(exc, window.replace("(", f"({at}", 1)) if window else exc
        if n == 0:
            note = f"({at}no parameter was changed by this backward and no gradient was kept)"
        else:
            also = (f", nor were the {waiting} small parameter(s) batched for the end of the "
                    "backward" if waiting else "")
            note = (f"({at}{n} parameter(s) had already been updated in place by this backward; "
                    f"{pname} and the parameters not yet reached were not changed{also}, and no "
                    "gradient was kept; call optimizer.step() before the next backward)")
        return with_note(exc, note)

    def _batch_failure(self, exc: BaseException, params: List[torch.Tensor],
                       later: List[torch.Tensor]) -> BaseException:
        """A batched update of the small ``params`` failed (their state entries are restored):
        unmark them and the ``later`` batches, reset the backward, say what it changed."""
        self._unmark(list(params) + list(later))
        n = self._n_updated
        self._abort_backward()
        if not isinstance(exc, Exception):
            return exc
        names = ", ".join(self._pname(p) for p in params[:3])
        return with_note(exc, (
            f"(in the batched update of {len(params)} small {params[0].dtype} "
            f"parameter(s) ({names}{', ...' if len(params) > 3 else ''}) at the end of "
            f"the backward; their state entries were restored; {n} parameter(s) had "
            "already been updated in place by this backward; no gradient was kept; call "
            "optimizer.step() before the next backward)"))

    def _abort_backward(self) -> None:
        try:
            self._failed_tasks.add(current_task_id())
        except Exception:
            pass
        self._failed_tasks.update(self._active_tasks)
        self._active_tasks.clear()
        for t in self._found_inf.values():
            t.zero_()
        self._n_updated = 0
        self._began = False
        self._drop_pending()

    def _unmark(self, params: List[torch.Tensor]) -> None:
        """Forget that ``params`` were updated in this step (they were not)."""
        for p in params:
            if self._stamp.get(p) == self._token:
                del self._stamp[p]

    def _drop_pending(self) -> None:
        """Forget the small parameters waiting for the end of a backward that failed: they are
        not updated (nor marked as updated) and their gradients are freed."""
        self._unmark(self._pending.params())
        self._pending.take()
