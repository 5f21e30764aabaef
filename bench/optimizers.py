"""The optimizers the memory and convergence benchmarks compare: one entry each in
``OPTIMIZERS``, so that adding an optimizer to both benchmarks is one line here.

An entry says how to build the optimizer for a model, whether it updates inside the backward
(``fused_backward(loss, lr)``: this project and lomo-optim) or after it (``loss.backward();
step(); zero_grad(set_to_none=True)``), and the learning rate the convergence benchmark uses
(tuned by its ``--sweep``). The sweep behind the values (conv-18m, 200 steps x 8 x 256 tokens,
final eval loss in nats/byte; an interrupted run, so only these points): AdaLomo 0.02: 1.988,
0.05: 1.965, 0.1: 2.233, 0.2: 2.530; Lomo 0.05: 2.913, 0.1: 2.921, 0.2: 3.244, 0.4: 3.247;
AdamW 1e-3: 2.008, 2e-3: 2.279. GoLore / GaLore: 1e-2, not swept here.

Conventions: no weight decay anywhere (the comparison is of update rules); AdamW and Adafactor
with torch's defaults otherwise (AdamW betas (0.9, 0.999), eps 1e-8; the foreach
implementations). lomo-optim 0.1.1 allocates AdaLomo's state with ``.cuda()``; on another device
``torch.Tensor.cuda`` is the identity while it is constructed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch


@contextlib.contextmanager
def lomo_optim_on(device):
    """lomo-optim calls ``.cuda()`` on its state; off CUDA make that a no-op."""
    if torch.device(device).type == "cuda":
        yield
        return
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


def _lk(cls_name: str, **kw):
    def make(model, lr, device, backend="auto"):
        import lomo_kernels

        return getattr(lomo_kernels, cls_name)(model, lr=lr, backend=backend, **kw)
    return make


def _lk_one_window(cls_name: str, **kw):
    """K=1 through the accumulation buffers: every backward fills float32 buffers and the update
    runs in step() (exact clipping from one backward). Built with K=2 (buffers and workspace),
    then windows of one backward."""
    def make(model, lr, device, backend="auto"):
        import lomo_kernels

        opt = getattr(lomo_kernels, cls_name)(model, lr=lr, backend=backend,
                                               accumulation_steps=2, **kw)
        opt._window.steps = 1
        return opt
    return make


def _lomo_optim(cls_name: str):
    def make(model, lr, device, backend=None):
        import lomo_optim

        with lomo_optim_on(device):
            return getattr(lomo_optim, cls_name)(model, lr=lr)
    return make


def _torch(cls_name: str, **kw):
    def make(model, lr, device, backend=None):
        return getattr(torch.optim, cls_name)(model.parameters(), lr=lr, weight_decay=0.0, **kw)
    return make


# GoLore / GaLore: every matrix low-rank (embeddings and output layer too, the smallest state),
# inner AdamW, GaLore's scale 0.25; projectors refreshed every 50 updates, so that runs of a few
# hundred steps see several subspaces. memory_estimate.py reads the rank from here.
GOLORE = dict(rank=128, update_proj_gap=50)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    name: str
    label: str  # for tables and plots
    make: Callable  # (model, lr, device, backend="auto") -> optimizer (backend: lk-* only)
    in_backward: bool  # updates inside the backward (fused_backward) or after it (step)
    lr: float  # the convergence benchmark's learning rate (tuned by its --sweep)
    sweep: tuple = ()  # learning rates its --sweep tries
    family: str = ""  # optimizers that compute the same update share a family (and a tuned lr)
    default_in: tuple = ()  # the committed runs that include it: "memory", "convergence"
    micro_batches: int = 1  # backwards per step (accumulation_steps; each on the step's batch)


OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for s in (
    OptimizerSpec("lk-adalomo", "AdaLomo (lomo_kernels)", _lk("AdaLomo"), True,
                  lr=5e-2, sweep=(2e-2, 5e-2, 1e-1, 2e-1), family="adalomo",
                  default_in=("memory", "convergence")),
    OptimizerSpec("lk-lomo", "Lomo (lomo_kernels)", _lk("Lomo"), True,
                  lr=0.05, sweep=(0.05, 0.1, 0.2, 0.4), family="lomo",
                  default_in=("memory", "convergence")),
    OptimizerSpec("lomo_optim-adalomo", "AdaLomo (lomo-optim)", _lomo_optim("AdaLomo"), True,
                  lr=5e-2, family="adalomo", default_in=("memory", "convergence")),
    OptimizerSpec("lomo_optim-lomo", "Lomo (lomo-optim)", _lomo_optim("Lomo"), True,
                  lr=0.05, family="lomo", default_in=("memory",)),
    OptimizerSpec("adamw", "AdamW (torch, foreach)", _torch("AdamW", foreach=True), False,
                  lr=1e-3, sweep=(5e-4, 1e-3, 2e-3, 4e-3), family="adamw",
                  default_in=("memory", "convergence")),
    OptimizerSpec("adamw-fused", "AdamW (torch, fused)", _torch("AdamW", fused=True), False,
                  lr=1e-3, family="adamw"),
    OptimizerSpec("adafactor", "Adafactor (torch, foreach)", _torch("Adafactor", foreach=True),
                  False, lr=1e-2, sweep=(3e-3, 1e-2, 3e-2), family="adafactor",
                  default_in=("memory",)),
    OptimizerSpec("lk-golore", "GoLore (lomo_kernels, random)",
                  _lk("GoLore", projection="random", **GOLORE), True,
                  lr=1e-2, sweep=(3e-3, 1e-2, 3e-2), family="golore",
                  default_in=("memory", "convergence")),
    # GaLore's recipe (the fine-tuning CLI's): the embeddings and the output layer at full rank
    # (full-size float32 Adam moments: 8 bytes per element of each vocabulary-sized matrix)
    OptimizerSpec("lk-golore-embfull", "GoLore (lomo_kernels, random; embeddings full rank)",
                  _lk("GoLore", projection="random", exclude=("*embed_tokens*", "lm_head.weight"),
                      **GOLORE), True, lr=1e-2, family="golore"),
    OptimizerSpec("lk-galore", "GaLore (lomo_kernels, svd)",
                  _lk("GoLore", projection="svd", **GOLORE), True,
                  lr=1e-2, sweep=(3e-3, 1e-2, 3e-2), family="galore",
                  default_in=("memory", "convergence")),
    # rank 64: half the state of rank 128 (what fits the Llama-3-8B shape in 21 GiB)
    OptimizerSpec("lk-golore-r64", "GoLore (lomo_kernels, random, rank 64)",
                  _lk("GoLore", projection="random", **{**GOLORE, "rank": 64}), True,
                  lr=1e-2, family="golore"),
    OptimizerSpec("lk-galore-r64", "GaLore (lomo_kernels, svd, rank 64)",
                  _lk("GoLore", projection="svd", **{**GOLORE, "rank": 64}), True,
                  lr=1e-2, family="galore"),
    # gradient accumulation (docs/accumulation.md): 4 micro-batches per step into float32 or
    # bf16 buffers, and one micro-batch per step through float32 buffers (exact clipping in one
    # backward); the step's batch is each micro-batch's
    OptimizerSpec("lk-adalomo-acc4", "AdaLomo, 4 micro-batches, fp32 buffers",
                  _lk("AdaLomo", accumulation_steps=4), True, lr=5e-2, family="adalomo",
                  default_in=("memory",), micro_batches=4),
    OptimizerSpec("lk-adalomo-acc4-bf16", "AdaLomo, 4 micro-batches, bf16 buffers",
                  _lk("AdaLomo", accumulation_steps=4, accumulation_dtype="param"), True,
                  lr=5e-2, family="adalomo", default_in=("memory",), micro_batches=4),
    OptimizerSpec("lk-adalomo-window1", "AdaLomo, fp32 buffers, 1 micro-batch",
                  _lk_one_window("AdaLomo"), True, lr=5e-2, family="adalomo",
                  default_in=("memory",)),
)}


def defaults(bench: str) -> tuple[str, ...]:
    """The optimizers a committed run of ``bench`` ("memory", "convergence") includes."""
    return tuple(s.name for s in OPTIMIZERS.values() if bench in s.default_in)


def get(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def train_step(spec: OptimizerSpec, opt, model, batch, lr: float, *, autocast=None,
               loss_chunk: int | None = None):
    """One training step (forward, loss, backward with the update); returns the loss tensor.
    ``autocast``: a dtype for ``torch.autocast`` of the forward (mixed precision), or None.
    ``loss_chunk``: the output layer and loss over that many positions at a time
    (bench/chunked_loss.py), instead of the model's own loss over the whole sequence."""
    device_type = batch.device.type
    ctx = (torch.autocast(device_type, dtype=autocast) if autocast is not None
           else contextlib.nullcontext())
    if spec.micro_batches > 1:
        for _ in range(spec.micro_batches):  # the last fused_backward applies the window
            with ctx:
                loss = model(input_ids=batch, labels=batch).loss
            opt.fused_backward(loss / spec.micro_batches, lr)
        return loss
    with ctx:
        if loss_chunk:
            from bench.chunked_loss import chunked_lm_loss

            loss = chunked_lm_loss(model, batch, loss_chunk)
        else:
            loss = model(input_ids=batch, labels=batch).loss
    if spec.in_backward:
        opt.fused_backward(loss, lr)
    else:
        for g in opt.param_groups:
            g["lr"] = lr
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


def state_bytes(opt) -> int:
    """Bytes of the optimizer's persistent state tensors (``opt.state``; lomo-optim keeps AdaLomo's
    in its own dicts)."""
    from bench.memprobe import tensor_bytes

    total = tensor_bytes(list(getattr(opt, "state", {}).values()))
    for attr in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"):
        d = getattr(opt, attr, None)
        if isinstance(d, dict):
            total += tensor_bytes(list(d.values()))
    return total


def detach(opt) -> None:
    """Remove this project's hooks (lomo-optim has no way to; its model goes with it)."""
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
