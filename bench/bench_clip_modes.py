"""Step time of global-norm clipping, side by side in one run: the exact two-pass mode
(``grad_norm(loss)`` then ``fused_backward(loss, lr)``: two backward passes, lomo-optim's
scheme), the one-pass mode (``clip_mode="previous"``: one backward, clipped with the previous
step's norm, which the update kernels sum as they read the gradients) and no clipping, for
``Lomo`` and ``AdaLomo`` on a small Llama (``bench_backward.BACKWARD_MODELS``), plus a plain
forward + backward without any optimizer as the floor. Two modes through the accumulation
buffers (docs/accumulation.md), both clipped exactly from one backward per micro-batch:
``window1`` (every backward fills float32 buffers, ``step()`` updates from them: a window of
one micro-batch) and ``acc4`` (``accumulation_steps=4``: a step is 4 micro-batches of the same
batch with loss / 4; its ``per_micro_ms`` compares with the other modes' step times).

Each variant trains its own copy of the model; on CPU the variants are timed round-robin
(``timing.time_interleaved``) so that load from other processes hits them alike. Each step is a
forward and the backward(s) of the variant. The load average before and after is printed: on a
shared machine the absolute times move, the ratios much less.

    python bench/bench_clip_modes.py                              # bwd-small, bf16, CPU
    python bench/bench_clip_modes.py --model bwd-tiny --threads 2 --json out.json
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # python bench/bench_clip_modes.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import environment, shapes as model_shapes, timing as bench_timing
from bench.bench_backward import BACKWARD_MODELS, LR, build_model

MODES = ("unclipped", "exact", "previous", "window1", "acc4")
MICRO = {"acc4": 4}  # micro-batches per step


def make_step(opt_name: str, mode: str, model, ids, *, backend: str = "auto",
              clip_grad_norm: float = 1.0):
    """One training step of ``opt_name`` ("lomo" / "adalomo") with clipping ``mode`` (or the
    plain forward + backward when ``opt_name`` is None)."""
    if opt_name is None:
        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            for p in model.parameters():
                p.grad = None
        return step

    import lomo_kernels

    cls = lomo_kernels.Lomo if opt_name == "lomo" else lomo_kernels.AdaLomo
    lr = LR[opt_name]
    kw = {} if mode == "unclipped" else dict(clip_grad_norm=clip_grad_norm, clip_mode=mode)
    if mode in ("window1", "acc4"):  # exact clipping of the accumulated gradient
        kw = dict(clip_grad_norm=clip_grad_norm, accumulation_steps=MICRO.get(mode, 2))
    opt = cls(model, lr=lr, backend=backend, **kw)
    if mode == "window1":
        opt._window.steps = 1  # (built with K=2: buffers and workspace) windows of one backward
    micro = MICRO.get(mode, 1)

    def step():
        for _ in range(micro):
            loss = model(input_ids=ids, labels=ids).loss
            if mode == "exact":
                opt.grad_norm(loss)  # the first backward: the exact norm of this step
            opt.fused_backward(loss / micro if micro > 1 else loss, lr)
    step.opt = opt  # alive as long as the step
    return step


def run(device="cpu", model_name="bwd-small", dtype=torch.bfloat16, *, backend="auto",
        clip_grad_norm=1.0, timing=None) -> dict:
    """Time every variant; returns the environment and one row per variant."""
    device = torch.device(device)
    dtype = model_shapes.parse_dtype(dtype) if isinstance(dtype, str) else dtype
    base, ids = build_model(model_name, dtype, device)
    variants = [(None, "plain backward")] + [(o, m) for o in ("lomo", "adalomo") for m in MODES]
    timing = timing or bench_timing.timing_defaults(device, "small")
    load_before = os.getloadavg()
    with warnings.catch_warnings():
        # clip_mode="previous" flags steps whose norm is far above the threshold (the bench's
        # threshold is arbitrary): the step time is what is measured here
        warnings.simplefilter("ignore", RuntimeWarning)
        steps = {v: make_step(v[0], v[1], copy.deepcopy(base), ids, backend=backend,
                              clip_grad_norm=clip_grad_norm) for v in variants}
        timings = bench_timing.time_interleaved(steps, device, **timing)
    load_after = os.getloadavg()
    plain = timings[variants[0]].median_ms
    rows = []
    for (opt_name, mode), t in timings.items():
        unclipped = timings.get((opt_name, "unclipped")) if opt_name else None
        micro = MICRO.get(mode, 1)
        per = t.median_ms / micro  # per micro-batch: what compares with a K=1 step
        rows.append(dict(
            optimizer=opt_name or "none", mode=mode, median_ms=t.median_ms, p20_ms=t.p20_ms,
            p80_ms=t.p80_ms, reps=t.reps, micro_batches=micro, per_micro_ms=per,
            ratio_to_unclipped=per / unclipped.median_ms if unclipped else None,
            ratio_to_plain_backward=per / plain))
    m = BACKWARD_MODELS[model_name]
    env = environment.environment(device)
    env.update(model=model_name, batch=m["batch"], seq=m["seq"], dtype=model_shapes.dtype_name(dtype),
               backend=backend, clip_grad_norm=clip_grad_norm, rep_ms=timing["rep_ms"],
               load_avg_before=[round(x, 2) for x in load_before],
               load_avg_after=[round(x, 2) for x in load_after])
    return {"environment": env, "rows": rows}


def format_table(result: dict) -> str:
    env = result["environment"]
    lines = [f"{env['model']} (batch {env['batch']} x seq {env['seq']}, {env['dtype']}), "
             f"{env['device_name']}, {env['cpu_threads']} threads, backend {env['backend']}, "
             f"clip_grad_norm {env['clip_grad_norm']}",
             f"load average (1, 5, 15 min) before {env['load_avg_before']}, after "
             f"{env['load_avg_after']}",
             "(acc4: a step of 4 micro-batches; the ratios are per micro-batch)",
             f"{'optimizer':9} {'clipping':16} {'median ms':>10} {'p20':>8} {'p80':>8} "
             f"{'x unclipped':>11} {'x plain bwd':>11}"]
    for r in result["rows"]:
        ratio = f"{r['ratio_to_unclipped']:.2f}" if r["ratio_to_unclipped"] else "-"
        lines.append(f"{r['optimizer']:9} {r['mode']:16} {r['median_ms']:10.1f} "
                     f"{r['p20_ms']:8.1f} {r['p80_ms']:8.1f} {ratio:>11} "
                     f"{r['ratio_to_plain_backward']:11.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="bwd-small", choices=sorted(BACKWARD_MODELS))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--clip-grad-norm", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rep-ms", type=float, default=None, help="timing budget per variant")
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    timing = bench_timing.timing_defaults(a.device, "small")
    if a.rep_ms:
        timing["rep_ms"] = a.rep_ms
    result = run(a.device, a.model, a.dtype, backend=a.backend, clip_grad_norm=a.clip_grad_norm,
                 timing=timing)
    print(format_table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
