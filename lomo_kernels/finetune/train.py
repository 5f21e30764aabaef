"""The training loop: K micro-batches per optimizer step, periodic evaluation and checkpoints.

One step with an in-backward optimizer (AdaLomo, Lomo, GoLore, GaLore) and K = 1 is
``grad_norm(loss)`` (exact global-norm clipping only) then ``fused_backward(loss, lr)``: the update
happens inside the backward. With K > 1 every micro-batch runs ``(loss / K).backward()`` and the
step ends with ``optimizer.step()`` (the optimizer built with ``accumulation_steps=K`` applies the
accumulated gradient); AdamW does the same with ``clip_grad_*_`` before its ``step()``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .distributed import sum_over_ranks
from .optimizers import lr_at


@dataclass
class History:
    losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    evals: list = field(default_factory=list)  # {"step", "eval_loss"}
    tokens: int = 0  # non-padding tokens trained on (all ranks)
    # what tokens/s is computed from: the steps after a process's first (its warm-up, kernel
    # compilation and allocations are not timed)
    timed_tokens: int = 0
    timed_seconds: float = 0.0
    timed_steps: int = 0

    def state_dict(self) -> dict:
        return dict(vars(self))


def train_step(model, opt, micro_batches: list, lr: float, *, in_backward: bool,
               clip_grad_norm=None, clip_grad_value=None):
    """One optimizer step over ``micro_batches``; returns the mean loss (a tensor, not synced)."""
    k = len(micro_batches)
    if in_backward and k == 1:
        loss = model(**micro_batches[0]).loss
        if opt.clip_grad_norm is not None and opt.clip_mode == "exact":
            opt.grad_norm(loss)  # first pass: the global norm, no update
        opt.fused_backward(loss, lr)  # (second) pass: the update, fused into the backward
        return loss.detach()
    for g in opt.param_groups:
        g["lr"] = lr
    total = None
    for batch in micro_batches:
        loss = model(**batch).loss
        if k > 1:
            loss = loss / k
        loss.backward()  # in-backward optimizers: accumulated (accumulation_steps=k)
        total = loss.detach() if total is None else total + loss.detach()
    if not in_backward:
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        if clip_grad_value:
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_grad_value)
    opt.step()
    if not in_backward:
        opt.zero_grad(set_to_none=True)
    return total


def _tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def train(run, history: History, start_step: int, progress=None) -> History:
    """Steps ``start_step .. run.total_steps - 1`` of ``run`` (see run.Run), appending to
    ``history``; evaluates every ``--eval-steps`` and checkpoints every ``--save-steps``."""
    args, device = run.args, run.device
    t_last = None
    for step in range(start_step, run.total_steps):
        micro = [run.stream.next() for _ in range(args.gradient_accumulation_steps)]
        lr = lr_at(step, args.lr, run.total_steps, args.schedule, args.warmup_steps)
        loss = train_step(run.model, run.opt, micro, lr, in_backward=run.in_backward,
                          clip_grad_norm=args.clip_grad_norm,
                          clip_grad_value=args.clip_grad_value)
        # one host sync per step: the loss (mean over ranks) and the tokens (sum over ranks)
        loss_sum, tokens = sum_over_ranks([float(loss), sum(_tokens(b) for b in micro)], device)
        loss_value = loss_sum / run.world
        if run.in_backward:  # (the norm is computed by then: no further wait)
            history.grad_norms.append(float(run.opt.last_grad_norm))
        history.losses.append(loss_value)
        history.lrs.append(lr)
        now = time.perf_counter()
        history.tokens += int(tokens)
        if t_last is not None:
            history.timed_tokens += int(tokens)
            history.timed_seconds += now - t_last
            history.timed_steps += 1
        if progress is not None:
            tps = history.timed_tokens / history.timed_seconds if history.timed_seconds else 0.0
            extra = {"grad_norm": f"{history.grad_norms[-1]:.3g}"} if run.in_backward else {}
            progress.set_postfix(loss=f"{loss_value:.3f}", **extra, tok_s=f"{tps:,.0f}",
                                 refresh=False)
            progress.update(1)
        if not math.isfinite(loss_value):
            break
        done = step + 1
        if args.eval_steps and done % args.eval_steps == 0 and done < run.total_steps:
            value = run.eval_loss()
            history.evals.append({"step": done, "eval_loss": value})
            if progress is not None and value is not None:
                progress.write(f"step {done}: eval loss {value:.4f}")
        if args.save_steps and done % args.save_steps == 0:
            run.save_checkpoint(done, history)
        t_last = time.perf_counter()  # evaluation and checkpoints are not training time
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return history
