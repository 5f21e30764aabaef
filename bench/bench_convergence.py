"""Convergence against AdamW on a real corpus: the same small Llama-shaped model trained from the
same initialisation on the same batches, with the same schedule and seed, by each optimizer.

    python bench/bench_convergence.py --update-committed          # the committed run (~30 min)
    python bench/bench_convergence.py --sweep --update-committed  # the learning-rate sweep
    python bench/bench_convergence.py --smoke --out /tmp/c        # CI (~30 s)

Corpus: the Python standard library's own source files (code, comments and docstrings; every
``.py`` file under ``sysconfig.get_paths()["stdlib"]`` outside test suites and site-packages),
one document per file, byte-level tokens (256 bytes + BOS/EOS/PAD, lomo_kernels.finetune's
ByteTokenizer). Files are split by a hash of their path: 1 in 20 is held out for evaluation.

Model: Llama-shaped (lomo_kernels.finetune's builders), 18M parameters by default (hidden 512,
6 layers, 8 heads, 4 KV heads, intermediate 1408, untied embeddings), fp32 parameters with a
bf16-autocast forward (mixed precision: the optimizers see fp32 parameters and gradients).

Training: ``--steps`` steps of ``--batch-size`` random windows of ``--seq-len`` tokens, drawn
from one seeded generator (every optimizer sees the same tokens in the same order); learning
rate: linear warm-up over ``--warmup`` steps, then cosine decay to 10%; no weight decay, no
clipping. Each optimizer runs in its own process, one after the other (``--jobs`` to run
several at once: faster, but then their times disturb each other). The learning rate of each is
the tuned value in bench/optimizers.py (``--lr NAME=VALUE`` overrides); optimizers computing the
same update (lomo-optim's AdaLomo and this project's) share it. ``--sweep`` runs the sweep that
tuned them: every optimizer's ``sweep`` values at the same settings, ranked by final eval loss.

Reported per optimizer: eval loss (the mean over ``--eval-batches`` fixed held-out batches)
against steps and against training wall time (plots; evaluation time excluded), the final eval
loss and its gap to AdamW's, tokens/s, optimizer-state bytes, and the peak resident memory above
the process's baseline (taken after the corpus is loaded, before the model is built). The
machine load (1/5/15-minute averages) is recorded before and after each run. The JSON is
written after every run (an interrupted run keeps what it measured); ``--merge`` keeps the runs
of an existing file that this invocation does not repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # python bench/bench_convergence.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import memprobe, optimizers
from bench.environment import add_output_args, environment, output_dir, script_parser
from bench.report import plot_curves, plot_sweep, render_table, wrap
from bench.results import merge_rows, write_json_payload

MODELS = {
    # 18.0M parameters: 6 x 2.95M per layer + 2 x 259 x 512 embeddings
    "conv-18m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=4, vocab_size=None,
                     tie_word_embeddings=False),
    # CI smoke: 0.1M parameters
    "conv-tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=None,
                      tie_word_embeddings=False),
}
DEFAULT_OPTIMIZERS = optimizers.defaults("convergence")
BASELINE = "adamw"
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HELD_OUT_ONE_IN = 20

SMOKE = dict(model="conv-tiny", steps=24, batch_size=4, seq_len=64, warmup=4, eval_every=12,
             eval_batches=2, max_files=60, isolation="inprocess")


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------


def stdlib_files(max_files: int | None = None) -> list[tuple[str, bytes]]:
    """(path relative to the standard library, contents) of its non-empty ``.py`` files, sorted
    by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and d[0] != ".")
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if f.endswith(".py") and p.stat().st_size > 0:
                out.append((p.relative_to(root).as_posix(), p.read_bytes()))
    out.sort()
    return out[:max_files] if max_files else out


def is_held_out(relpath: str) -> bool:
    return zlib.crc32(relpath.encode()) % HELD_OUT_ONE_IN == 0


def token_streams(files) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train, held-out) int16 token streams: each file as BOS + its UTF-8 bytes + EOS."""
    from lomo_kernels.finetune import ByteTokenizer

    tok = ByteTokenizer()
    bos = torch.tensor([tok.bos_token_id], dtype=torch.int16)
    eos = torch.tensor([tok.eos_token_id], dtype=torch.int16)
    parts = {False: [], True: []}
    for rel, data in files:
        body = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16)
        parts[is_held_out(rel)] += [bos, body, eos]
    if not parts[True]:  # a tiny --max-files: hold out the last file
        parts[True] = parts[False][-3:]
        parts[False] = parts[False][:-3]
    train, held = torch.cat(parts[False]), torch.cat(parts[True])
    info = {"files": len(files), "held_out_files": sum(is_held_out(r) for r, _ in files),
            "train_tokens": train.numel(), "held_out_tokens": held.numel()}
    return train, held, info


# ---------------------------------------------------------------------------------------------
# One training run (in a worker process)
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, base: float, steps: int, warmup: int) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, steps - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def eval_loss(model, batches, autocast) -> float:
    model.eval()
    total = 0.0
    for b in batches:
        with (torch.autocast(b.device.type, dtype=autocast) if autocast is not None
              else contextlib.nullcontext()):
            total += float(model(input_ids=b, labels=b).loss)
    model.train()
    return total / len(batches)


def run_one(case: dict) -> dict:
    """Train one optimizer as ``case`` says; returns its record (curves, throughput, memory)."""
    from lomo_kernels.finetune import build_config, build_model, sample_batch

    torch.set_num_threads(case["threads"])
    load_before = os.getloadavg()
    train, held, _ = token_streams(stdlib_files(case["max_files"]))
    spec = optimizers.get(case["optimizer"])
    autocast = {"bf16": torch.bfloat16, "none": None}[case["autocast"]]
    device = torch.device("cpu")
    memprobe.free_memory(device)
    rss_base = memprobe.proc_status_bytes("VmRSS")["VmRSS"]
    memprobe.reset_rss_peak()
    cfg = build_config(dict(MODELS[case["model"]]), max_position_embeddings=case["seq_len"])
    model = build_model(cfg, dtype=torch.float32, device=device, seed=case["seed"])
    opt = spec.make(model, case["lr"], device)
    eval_gen = torch.Generator().manual_seed(10_000 + case["seed"])
    eval_batches = [sample_batch(held, case["batch_size"], case["seq_len"], eval_gen).long()
                    for _ in range(case["eval_batches"])]
    gen = torch.Generator().manual_seed(case["seed"])
    steps, curve, losses = case["steps"], [], []
    train_s = 0.0
    curve.append({"step": 0, "train_s": 0.0, "eval_loss": eval_loss(model, eval_batches, autocast)})
    for step in range(steps):
        batch = sample_batch(train, case["batch_size"], case["seq_len"], gen).long()
        t0 = time.perf_counter()
        loss = optimizers.train_step(spec, opt, model, batch,
                                     lr_at(step, case["lr"], steps, case["warmup"]),
                                     autocast=autocast)
        losses.append(float(loss.detach()))
        train_s += time.perf_counter() - t0
        if not math.isfinite(losses[-1]):
            break
        if (step + 1) % case["eval_every"] == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "train_s": train_s,
                          "eval_loss": eval_loss(model, eval_batches, autocast)})
    peak = memprobe.proc_status_bytes("VmHWM")["VmHWM"]
    n_params = sum(p.numel() for p in model.parameters())
    return {
        **case, "label": spec.label, "in_backward": spec.in_backward, "n_params": n_params,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "curve": curve, "train_losses": losses, "final_eval_loss": curve[-1]["eval_loss"],
        "finite": all(math.isfinite(x) for x in losses),
        "train_s": train_s, "tokens": len(losses) * case["batch_size"] * case["seq_len"],
        "tokens_per_s": len(losses) * case["batch_size"] * case["seq_len"] / max(train_s, 1e-9),
        "state_bytes": optimizers.state_bytes(opt),
        "peak_rss_above_base_bytes": peak - rss_base, "rss_base_bytes": rss_base,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }


def run_isolated(case: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)]
    r = subprocess.run(cmd, capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {**case, "error": (r.stderr or r.stdout)[-3000:], "returncode": r.returncode}


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def summary_table(runs: list[dict]) -> str:
    base = next((r for r in runs if r["optimizer"] == BASELINE and "error" not in r), None)
    rows = []
    for r in runs:
        if "error" in r:
            rows.append([r["optimizer"], r["lr"], "error"] + ["-"] * 5)
            continue
        gap = (100 * (r["final_eval_loss"] / base["final_eval_loss"] - 1)) if base else None
        state_frac = (100 * r["state_bytes"] / base["state_bytes"]) if base and \
            base["state_bytes"] else None
        rows.append([r["optimizer"], f"{r['lr']:g}", f"{r['final_eval_loss']:.4f}",
                     "-" if gap is None else f"{gap:+.2f}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['state_bytes'] / 2**20:.2f}",
                     "-" if state_frac is None else f"{state_frac:.1f}",
                     f"{r['peak_rss_above_base_bytes'] / 2**20:.0f}"])
    return render_table(["optimizer", "lr", "final eval loss (nats)", f"vs {BASELINE} (%)",
                         "tokens/s", "state (MiB)", f"state vs {BASELINE} (%)",
                         "peak RSS+ (MiB)"], rows)


def sweep_table(runs: list[dict]) -> str:
    rows = [[r["optimizer"], f"{r['lr']:g}",
             "error" if "error" in r else f"{r['final_eval_loss']:.4f}",
             "*" if r.get("best") else ""] for r in runs]
    return render_table(["optimizer", "lr", "final eval loss (nats)", "best"], rows, keys=2)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = script_parser("python bench/bench_convergence.py", __doc__)
    ap.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                    help=f"comma-separated, from: {', '.join(optimizers.OPTIMIZERS)}")
    ap.add_argument("--lr", nargs="*", default=[], metavar="NAME=VALUE",
                    help="override the tuned learning rate of an optimizer")
    ap.add_argument("--model", choices=sorted(MODELS), default="conv-18m")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=12, help="warm-up steps")
    ap.add_argument("--eval-every", type=int, default=20, help="steps between evaluations")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--autocast", choices=("bf16", "none"), default="bf16",
                    help="forward in bf16 autocast over fp32 parameters (default), or all fp32")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (default 1: on a shared 2-core machine one "
                         "thread per run is faster and steadier than OpenMP spin-waits)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    ap.add_argument("--max-files", type=int, default=None, help="only the first N files")
    ap.add_argument("--isolation", choices=("subprocess", "inprocess"), default="subprocess")
    ap.add_argument("--sweep", action="store_true",
                    help="the learning-rate sweep: every optimizer's sweep values (one per "
                         "family), ranked by final eval loss")
    ap.add_argument("--smoke", action="store_true",
                    help="a ~30-second run of the whole pipeline (CI): "
                         + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    add_output_args(ap, "convergence.json / .png (convergence_sweep.* with --sweep)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs of an existing convergence.json (convergence_sweep.json) "
                         "in the output directory that this run does not repeat")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    return args


def make_cases(args) -> list[dict]:
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    specs = [optimizers.get(n) for n in names]
    overrides = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        optimizers.get(name)
        overrides[name] = float(value)
    base = dict(model=args.model, steps=args.steps, batch_size=args.batch_size,
                seq_len=args.seq_len, warmup=args.warmup, eval_every=args.eval_every,
                eval_batches=args.eval_batches, seed=args.seed, autocast=args.autocast,
                threads=args.threads, max_files=args.max_files)
    cases = []
    if args.sweep:
        families = set()
        for s in specs:
            if s.family in families or not s.sweep:
                continue
            families.add(s.family)
            cases += [{**base, "optimizer": s.name, "lr": lr} for lr in s.sweep]
    else:
        cases = [{**base, "optimizer": s.name, "lr": overrides.get(s.name, s.lr)} for s in specs]
    return cases


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_one(json.loads(args.worker))), flush=True)
        return {}
    t0 = time.perf_counter()
    env = environment("cpu")
    cases = make_cases(args)
    _, _, corpus = token_streams(stdlib_files(args.max_files))
    print(wrap(f"corpus: {corpus['files']} standard-library files ({corpus['held_out_files']} "
               f"held out), {corpus['train_tokens']:,} training and "
               f"{corpus['held_out_tokens']:,} held-out tokens; {len(cases)} runs of "
               f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens"), flush=True)
    runner = run_isolated if args.isolation == "subprocess" else run_one
    out = output_dir(args, env)
    stem = "convergence_sweep" if args.sweep else "convergence"
    key = (lambda r: (r["optimizer"], r["lr"])) if args.sweep else (lambda r: r["optimizer"])
    old = []
    if args.merge and (out / f"{stem}.json").exists():
        old = json.loads((out / f"{stem}.json").read_text())["runs"]
    done = []
    payload = {"environment": env, "corpus": corpus,
               "args": {k: v for k, v in vars(args).items() if k != "worker"}}

    def save():  # after every run: a long run interrupted keeps what it measured
        payload.update(load_avg_end=[round(x, 2) for x in os.getloadavg()],
                       wall_s=round(time.perf_counter() - t0, 1),
                       runs=merge_rows(old, sorted(done, key=cases_order), key))
        write_json_payload(out / f"{stem}.json", payload)

    cases_order = lambda r: next(i for i, c in enumerate(cases) if key(c) == key(r))  # noqa: E731

    def go(case):
        r = runner(case)
        msg = ("error" if "error" in r else
               f"final eval loss {r['final_eval_loss']:.4f}, {r['tokens_per_s']:,.0f} tokens/s")
        print(f"  {case['optimizer']} lr {case['lr']:g}: {msg}", file=sys.stderr, flush=True)
        done.append(r)
        save()
        return r

    if args.jobs > 1 and args.isolation == "subprocess":
        with ThreadPoolExecutor(args.jobs) as ex:
            list(ex.map(go, cases))
    else:
        for c in cases:
            go(c)
    runs = payload["runs"]
    if args.sweep:
        for name in dict.fromkeys(r["optimizer"] for r in runs):
            ok = [r for r in runs if r["optimizer"] == name and "error" not in r
                  and math.isfinite(r["final_eval_loss"])]
            for r in runs:
                r.pop("best", None)
            if ok:
                min(ok, key=lambda r: r["final_eval_loss"])["best"] = True
        print(sweep_table(runs))
        plotted = plot_sweep(out / f"{stem}.png", runs, env)
    else:
        print(summary_table(runs))
        n_params = next((r["n_params"] for r in runs if "n_params" in r), 0)
        plotted = plot_curves(out / f"{stem}.png", runs, env,
                              f"{args.model} ({n_params / 1e6:.1f}M parameters), {args.steps} "
                              f"steps x {args.batch_size} x {args.seq_len} tokens, Python "
                              "standard library, held-out files")
    write_json_payload(out / f"{stem}.json", payload)
    print(wrap(f"wrote {out / stem}.json" + (", .png" if plotted else "")
               + f" in {payload['wall_s']} s (machine load at the end: "
               f"{payload['load_avg_end']})"))
    return payload


if __name__ == "__main__":
    main()
