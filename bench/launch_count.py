"""Kernel launches of one optimizer step of a whole model, counted without a GPU.

The model's parameters are built on the meta device (shapes only, no memory) and the real
optimizer runs one updating backward over them (``backend="torch"``: the reference runs on meta
tensors); every call of an update op is recorded with the shapes it updates. The launches a GPU
backend would make are the calls times the launches per call of that backend's kernels, read
from ``bench/launches_per_call.json`` ("before": the kernels as they were when batching was
added; "after": the kernels as they are, counted by the emulation and the Triton launchers).

Also reported: the small-parameter gradients the optimizer keeps until the end of the backward
(``batch_small_params``), and the optimizer's own per-step operations outside the update kernels
(zeroing the gradient-norm accumulators, the norm, the next clip coefficient, the overflow
flags; each a small kernel on a GPU, plus the one device-to-host copy of the step).

    python bench/launch_count.py                     # Llama-3-8B, bf16, Lomo and AdaLomo
    python bench/launch_count.py --model llama7b --dtype fp32
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/launch_count.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import shapes as model_shapes
from lomo_kernels import AdaLomo, Lomo, ops

TABLE_FILE = Path(__file__).with_name("launches_per_call.json")
OPTIMIZERS = {"lomo": Lomo, "adalomo": AdaLomo}
META = torch.device("meta")
# aten ops that launch nothing (views and metadata)
_NO_LAUNCH = {"view", "_unsafe_view", "reshape", "_reshape_alias", "slice", "alias", "detach",
              "as_strided", "expand", "select", "unsqueeze", "squeeze", "t", "transpose",
              "permute", "lift_fresh", "_to_copy_noop"}


def launch_table(path: Path = TABLE_FILE) -> dict:
    """``{"before": {backend: {key: n}}, "after": {...}}`` (see the JSON file's "about")."""
    table = json.loads(Path(path).read_text())
    return {k: v for k, v in table.items() if k != "about"}


def meta_params(model: str = "llama3-8b", dtype: torch.dtype = torch.bfloat16):
    """Every parameter of ``model`` (``bench.shapes.MODEL_CONFIGS``) on the meta device."""
    shapes = model_shapes.llama_param_shapes(**model_shapes.MODEL_CONFIGS[model])
    return [torch.nn.Parameter(torch.empty(s, dtype=dtype, device=META)) for s in shapes]


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _NO_LAUNCH:
            self.n += 1
        return func(*args, **(kwargs or {}))


def count_op_calls(params, optimizer: str = "adalomo", *, batch_small_params: bool = True,
                   clip_grad_norm=None, clip_mode: str = "exact") -> dict:
    """One updating backward of ``optimizer`` over the meta ``params``.

    Returns ``calls`` (``[(op, [shape, ...]), ...]`` in call order), ``kept_grad_bytes`` (the
    small-parameter gradients held until the end of the backward) and ``bookkeeping_ops`` (the
    optimizer's own device operations per step, outside the update ops)."""
    opt = OPTIMIZERS[optimizer](params, lr=1e-3, backend="torch",
                                batch_small_params=batch_small_params,
                                clip_grad_norm=clip_grad_norm, clip_mode=clip_mode)
    calls = []
    pending = {"bytes": 0}

    def recorder(op, impl, multi):
        def call(*args):
            shapes = [tuple(t.shape) for t in args[0]] if multi else [tuple(args[0].shape)]
            calls.append((op, shapes))
            impl(*args)
        return call

    opt._impls[META] = recorder(opt._op, opt._impl(META), False)
    opt._multi_impls[META] = recorder(opt._multi_op, opt._multi_impl(META), True)
    counter = _CountOps()

    def counted(fn):
        def run(*a, **k):
            with counter:
                return fn(*a, **k)
        return run

    update_pending = opt._update_pending

    def flush():
        pending["bytes"] = opt._pending.grad_bytes()
        update_pending()

    opt._update_pending = flush
    opt._after_update = counted(opt._after_update)
    opt._buffers.zero_grad_sq = counted(opt._buffers.zero_grad_sq)
    loss = torch.stack([p.float().sum() for p in params]).sum()
    loss.backward()
    opt.step()
    opt.remove_hooks()
    return {"calls": calls, "kept_grad_bytes": pending["bytes"],
            "bookkeeping_ops": counter.n}


def _single(op: str, shape, launches: dict) -> int:
    if op == "adalomo_update_":
        return launches["adalomo_update_/factored" if len(shape) >= 2 else
                        "adalomo_update_/unfactored"]
    return launches[op]


def launches_of(calls, launches: dict) -> int:
    """Kernel launches of ``calls`` (from ``count_op_calls``) with ``launches`` (one backend's
    entry of ``launch_table()``): a multi-tensor op without a kernel (null) loops its
    single-tensor kernel."""
    total = 0
    for op, shapes in calls:
        if op in ops.SINGLE_OF:
            per_call = launches.get(op)
            if per_call is None:
                total += sum(_single(ops.SINGLE_OF[op], s, launches) for s in shapes)
            else:
                total += per_call
        else:
            total += _single(op, shapes[0], launches)
    return total


def report(model: str = "llama3-8b", dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One row per optimizer, kernels (before/after), backend and batching (off/on)."""
    table = launch_table()
    params = meta_params(model, dtype)
    rows = []
    for name in OPTIMIZERS:
        for batching in (False, True):
            counted = count_op_calls(params, name, batch_small_params=batching)
            for kernels, backends in table.items():
                for backend, launches in backends.items():
                    rows.append(dict(
                        model=model, dtype=model_shapes.dtype_name(dtype), optimizer=name,
                        kernels=kernels, backend=backend, batching=batching,
                        op_calls=len(counted["calls"]),
                        launches=launches_of(counted["calls"], launches),
                        bookkeeping_ops=counted["bookkeeping_ops"],
                        kept_grad_bytes=counted["kept_grad_bytes"],
                        n_params=len(params),
                        numel=sum(math.prod(p.shape) for p in params)))
    return rows


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3-8b", choices=sorted(model_shapes.MODEL_CONFIGS))
    ap.add_argument("--dtype", default="bf16")
    a = ap.parse_args(argv)
    rows = report(a.model, model_shapes.parse_dtype(a.dtype))
    r0 = rows[0]
    print(f"{a.model}: {r0['n_params']} parameters, {r0['numel']:,} elements, {a.dtype}; "
          "update-kernel launches of one step (no GPU: op calls x launches per call)")
    print(f"{'optimizer':9} {'kernels':7} {'backend':12} {'batching':8} {'op calls':>8} "
          f"{'launches':>8} {'bookkeeping':>11} {'kept grads':>12}")
    for r in rows:
        print(f"{r['optimizer']:9} {r['kernels']:7} {r['backend']:12} {str(r['batching']):8} "
              f"{r['op_calls']:8d} {r['launches']:8d} {r['bookkeeping_ops']:11d} "
              f"{r['kept_grad_bytes']:10,d} B")


if __name__ == "__main__":
    main()
