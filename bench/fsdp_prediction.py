"""Per-GPU memory of full-parameter AdaLomo under FSDP2, predicted from a model's public shape
(``--model-config``) alone: nothing is run or measured (docs/distributed.md, "Memory per rank").

    python bench/fsdp_prediction.py                 # bench/results/model/fsdp_prediction.json
    python bench/fsdp_prediction.py --out x.json    # elsewhere

Per rank, N ranks, bf16 parameters, FSDP2 units: every decoder layer, then the root (the
embeddings, the final norm and the output layer):

    parameters / N                  2 P / N bytes (P parameters)
    gathered parameters             2 (2 L1 + R): one layer and the prefetched next (L1 the largest
                                    layer), and the root's R, gathered through forward and backward
    largest gradient x 2            2 * 2 max(L1, R): a unit's unsharded gradient and its copy in
                                    the reduce-scatter buffer
    activations                     one micro-batch of s tokens, every layer checkpointed, SDPA:
                                    bench/memory_estimate.py's ``activation_bytes`` (the model
                                    that the measured single-process peaks check): the layer
                                    inputs (layers x s x h x 2 bytes), one layer's recomputation
                                    and its gradients (2 x s x (6 h + 2 kv + 4 i) x 2 bytes, no
                                    s^2 term with SDPA) and the logits (s x V x 20 bytes: bf16,
                                    the loss's fp32 upcast and log-softmax, and the gradients)
    AdaLomo state                   float32: a matrix's row factors sharded (ceil(m / N)), its
                                    columns whole (n); a vector's ceil(n / N)
    FSDP + AdamW                    16 P / N (bf16 weights and gradients, fp32 master weights and
                                    two moments) + the same gathered parameters and activations
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/fsdp_prediction.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import environment  # noqa: E402

MODELS = {"llama2-7b": "Llama-2-7B", "llama2-13b": "Llama-2-13B", "llama2-70b": "Llama-2-70B",
          "llama3-70b": "Llama-3-70B"}
RANKS, SEQ, ES = 8, 4096, 2  # GPUs, tokens per GPU (one sequence), bytes per bf16 element
COMMITTED = environment.RESULTS / "model" / "fsdp_prediction.json"
LAYER = re.compile(r"model\.layers\.(\d+)\.")


def units(shapes: dict[str, tuple]) -> dict[str, int]:
    """FSDP2 unit (``layer <i>`` or ``root``) -> its parameter count."""
    out: dict[str, int] = {}
    for name, shape in shapes.items():
        m = LAYER.match(name)
        key = f"layer {m.group(1)}" if m else "root"
        out[key] = out.get(key, 0) + math.prod(shape)
    return out


def adalomo_state_bytes(shapes: dict[str, tuple], ranks: int) -> int:
    return sum(4 * (-(-s[0] // ranks) + s[1]) if len(s) == 2 else 4 * -(-s[0] // ranks)
               for s in shapes.values())


def predict(model: str, ranks: int = RANKS, seq: int = SEQ) -> dict:
    """The parts of one rank's memory, in bytes, for the MODEL_CONFIGS shape ``model``."""
    from bench.bench_golore import model_shapes
    from bench.memory_estimate import activation_bytes
    from lomo_kernels.finetune.model import MODEL_CONFIGS

    cfg, shapes = MODEL_CONFIGS[model], model_shapes(model)
    v = cfg["vocab_size"]
    u = units(shapes)
    largest_layer = max(n for k, n in u.items() if k != "root")
    params = sum(u.values())
    parts = {
        "shards": ES * params / ranks,
        "gathered": ES * (2 * largest_layer + u["root"]),
        "largest_gradient_x2": 2 * ES * max(u.values()),
        "activations": activation_bytes(cfg, v, seq, 1, ES, checkpointing=True),
        "adalomo_state": adalomo_state_bytes(shapes, ranks),
    }
    total = sum(parts.values())
    adamw = 16 * params / ranks + parts["gathered"] + parts["activations"]
    return {"model": model, "name": MODELS.get(model, model), "parameters": params, **parts,
            "total": total, "fsdp_adamw": adamw}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=COMMITTED)
    a = ap.parse_args(argv)
    result = {
        "what": "predicted, not measured: per-GPU memory (bytes) from the public shapes, the "
                "model of bench/fsdp_prediction.py's docstring",
        "ranks": RANKS, "seq_len": SEQ, "batch_per_rank": 1, "param_dtype": "bf16",
        "git_commit": environment.environment("cpu")["git_commit"],
        "rows": [predict(m) for m in MODELS],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
