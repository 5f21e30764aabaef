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
import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/bench_backward.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import memprobe, shapes, timing as timers
from bench.microbench import kernel_backends
from bench.optimizers import lomo_optim_on
from bench.report import format_table
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
                    row.set_timing(timings[key], None)
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
                    row.set_timing(timers.time_fn(step, device, **timing), None)
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


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", choices=sorted(SIZE_MODELS), default=None)
    ap.add_argument("--models", nargs="+", default=None, choices=sorted(BACKWARD_MODELS))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--backends", nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = a.sizes or ("full" if a.device == "cuda" else "small")
    rows = run(a.device, a.models, dtype=a.dtype, backends=shapes.split_list(a.backends) or None,
               sizes=sizes)
    print(format_table(rows))


if __name__ == "__main__":
    main()
