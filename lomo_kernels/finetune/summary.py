"""The summary of a run: the dict ``main`` returns, its printed form, ``train_summary.json``."""

from __future__ import annotations

import json
import platform
import resource
import sys

import torch

from .distributed import local, max_over_ranks
from .optimizers import optimizer_state_bytes


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def versions() -> dict:
    from .. import __version__

    out = {"lomo_kernels": __version__, "python": platform.python_version(),
           "torch": torch.__version__}
    for name in ("transformers", "datasets"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", None)
    return out


def build_summary(run, history, *, eval_end, em_after, train_s: float, wall_s: float) -> dict:
    a, device, model = run.args, run.device, run.model
    losses = history.losses
    n_steps = len(losses)
    if history.timed_seconds > 0:
        tok_s = history.timed_tokens / history.timed_seconds
        step_s = history.timed_seconds / history.timed_steps
    else:
        tok_s = history.tokens / max(1e-9, train_s)
        step_s = train_s / max(1, n_steps)
    k = max(1, n_steps // 10)
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        peak, peak_kind = peak_rss_bytes(), "cpu_max_rss"
    em_before = run.em_before
    summary = {
        "optimizer": a.optimizer,
        "backend": run.backend,
        "model_config": run.model_name,
        "model": a.model,
        "n_params": sum(p.numel() for p in model.parameters()),  # global (sharded: DTensors)
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "dtype": a.dtype,
        "device": str(device),
        "lr": a.lr,
        "schedule": a.schedule,
        "steps": n_steps,
        "seq_len": a.seq_len,
        "batch_size": a.batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "gradient_checkpointing": a.gradient_checkpointing,
        "meta_init": a.meta_init,
        "data": run.data_stats or None,
        "epochs": run.stream.epochs_done(),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "first_loss_avg": sum(losses[:k]) / k if losses else None,
        "last_loss_avg": sum(losses[-k:]) / k if losses else None,
        "eval_loss_start": run.eval_start,
        "eval_loss_end": eval_end,
        "evals": history.evals,
        "exact_match_before": None if em_before is None else em_before["exact_match"],
        "exact_match_after": None if em_after is None else em_after["exact_match"],
        "exact_match_n": None if em_after is None else em_after["n"],
        "samples_before": None if em_before is None else em_before["samples"],
        "samples_after": None if em_after is None else em_after["samples"],
        "losses": losses,
        "lrs": history.lrs,
        "grad_norms": history.grad_norms,  # in-backward optimizers: last_grad_norm of each step
        "clip_mode": a.clip_mode,
        "tokens": history.tokens,
        "tokens_per_s": tok_s,
        "train_s": train_s,
        "wall_s": wall_s,
        "peak_memory_bytes": max_over_ranks(peak, device),  # the largest rank's
        "peak_memory_kind": peak_kind,
        "step_s": step_s,
        "optimizer_state_bytes": optimizer_state_bytes(run.opt),
        "finite": all(x == x and abs(x) != float("inf") for x in losses),
        "world_size": run.world,
        "param_bytes_per_rank": max_over_ranks(sum(
            local(p).numel() * p.element_size() for p in model.parameters()), device),
        "output_dir": a.output_dir,
        "args": {k: v for k, v in vars(a).items() if isinstance(v, (str, int, float, bool))
                 or v is None},
        "versions": versions(),
    }
    return summary


def write_summary(summary: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")


def format_samples(result: dict, when: str) -> str:
    lines = [f"exact match {when}: {result['exact_match']:.1%} of {result['n']} held-out prompts"]
    for s in result["samples"]:
        lines.append(f"  {'ok ' if s['match'] else 'no '} expected {s['expected']!r}, "
                     f"generated {s['generated'].strip()[:80]!r}")
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    def f(x, spec=".4f"):
        return "n/a" if x is None else format(x, spec)

    k = max(1, s["steps"] // 10)
    ranks = s.get("world_size", 1)
    accumulation = s.get("gradient_accumulation_steps", 1)
    lines = [
        "",
        "== lomo_kernels.finetune summary ==",
        f"model       {s['model_config']} ({s['n_params'] / 1e6:.2f}M params, {s['dtype']}, "
        f"{s['device']}{', grad ckpt' if s['gradient_checkpointing'] else ''})",
        f"optimizer   {s['optimizer']}" + (f" (backend {s['backend']})" if s["backend"] else "")
        + f", lr {s['lr']:g} {s['schedule']}",
        f"steps       {s['steps']} x {s['batch_size']}"
        + (f" x {accumulation} micro-batches" if accumulation > 1 else "")
        + (f" x {s['seq_len']} tokens" if s.get("data") is None
           else f" sequences (<= {s['seq_len']} tokens)")
        + (f" x {ranks} ranks (FSDP2)" if ranks > 1 else ""),
    ]
    d = s.get("data")
    if d:
        lines.append(f"data        {d['rows']} rows ({d['format']}), {d['train_sequences']} "
                     f"training sequences, {d['truncated']} truncated, {d['dropped']} dropped"
                     + (f"; {s['epochs']:.2f} epochs" if s.get("epochs") is not None else ""))
    lines += [
        f"train loss  first {f(s['first_loss'])} -> last {f(s['last_loss'])} "
        f"(mean of first/last {k}: {f(s['first_loss_avg'])} -> {f(s['last_loss_avg'])})",
        f"eval loss   {f(s['eval_loss_start'])} -> {f(s['eval_loss_end'])} (held-out)",
    ]
    if s.get("exact_match_after") is not None:
        lines.append(f"exact match {f(s['exact_match_before'], '.1%')} -> "
                     f"{f(s['exact_match_after'], '.1%')} ({s['exact_match_n']} held-out prompts, "
                     "greedy)")
    lines += [
        f"throughput  {s['tokens_per_s']:,.0f} tokens/s ({s['step_s'] * 1e3:.1f} ms/step)",
        f"opt. state  {fmt_bytes(s['optimizer_state_bytes'])}",
        f"peak memory {fmt_bytes(s['peak_memory_bytes'])} ({s['peak_memory_kind']}"
        + ("" if ranks == 1 else ", the largest rank's") + "); "
        f"parameters {fmt_bytes(s['param_bytes'])}"
        + ("" if ranks == 1 else f" ({fmt_bytes(s['param_bytes_per_rank'])} on the largest rank)"),
        f"wall time   {s['wall_s']:.1f} s (training {s['train_s']:.1f} s)",
    ]
    if s.get("output_dir"):
        lines.append(f"saved       {s['output_dir']} (save_pretrained, train_summary.json)")
    return "\n".join(lines)
