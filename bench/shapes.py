"""Dtypes, parameter shapes (single tensors and whole Llama-shaped models), shape presets, the
fewest bytes each update must move, and fresh random parameters for the microbenchmarks.

Effective bandwidth is computed from the *fewest* bytes an update can move (docs/spec.md, "The
fewest passes over memory"), whatever the implementation really moves, so GB/s values of
different implementations compare work done per second:

* LOMO: read p, read g, write p = 3 * element size (6 B/element for bf16).
* AdaLomo, p of 2 or more dimensions: g read 3x, p read 2x, p written once = 6 * element size
  (12 B/element for bf16); the O(m + n) fp32 row/column state is not counted.
* AdaLomo, 1-d p (unfactored, an fp32 state v of the same size): two passes are the minimum (the
  update norm needs every element before any write): (1) read g, p, v; (2) read g, p, v, write p
  and v = 5 * element size + 12 bytes per element. (docs/spec.md spells out only the 2-d count;
  this is the same reasoning applied to the 1-d case.)
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_ALIASES = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "fp16": "fp16", "fp32": "fp32",
}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def parse_dtype(name: str) -> torch.dtype:
    key = _DTYPE_ALIASES.get(name.strip().lower())
    if key is None:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[key]


def split_list(values: Iterable[str] | str | None) -> list[str]:
    """``["a,b", "c"]`` or ``"a,b"`` -> ``["a", "b", "c"]``."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out = []
    for v in values:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


# ---------------------------------------------------------------------------------------------
# Shapes: single tensors and whole models
# ---------------------------------------------------------------------------------------------

# Llama-shaped configurations (public config numbers; no weights are ever downloaded).
MODEL_CONFIGS = {
    # Llama-2-7B / Llama-7B: untied embeddings, multi-head attention (32 kv heads). 6.74e9 params.
    "llama7b": dict(hidden=4096, intermediate=11008, layers=32, vocab=32000, heads=32,
                    kv_heads=32, tie=False),
    # Llama-3-8B: grouped-query attention (8 kv heads), 128256-token vocabulary. 8.03e9 params.
    "llama3-8b": dict(hidden=4096, intermediate=14336, layers=32, vocab=128256, heads=32,
                      kv_heads=8, tie=False),
    # A toy model so that CI exercises the whole-model path in seconds.
    "llama-tiny": dict(hidden=256, intermediate=688, layers=2, vocab=1024, heads=4, kv_heads=2,
                       tie=False),
}


def llama_param_shapes(hidden, intermediate, layers, vocab, heads, kv_heads, tie=False):
    """Every parameter shape of a Llama model, in ``named_parameters()`` order."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    shapes = [(vocab, hidden)]  # embed_tokens
    for _ in range(layers):
        shapes += [
            (hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q, k, v, o
            (intermediate, hidden), (intermediate, hidden), (hidden, intermediate),  # gate, up, down
            (hidden,), (hidden,),  # input_layernorm, post_attention_layernorm
        ]
    shapes.append((hidden,))  # final norm
    if not tie:
        shapes.append((vocab, hidden))  # lm_head
    return shapes


def parse_shape(token: str) -> tuple[str, list[tuple[int, ...]]]:
    """``"4096x11008"`` -> ("4096x11008", [(4096, 11008)]); ``"llama7b"`` -> the model's list."""
    token = token.strip().lower()
    if token in MODEL_CONFIGS:
        return token, llama_param_shapes(**MODEL_CONFIGS[token])
    if not re.fullmatch(r"\d+(x\d+)*", token):
        raise ValueError(
            f"bad shape {token!r}: use e.g. 4096, 4096x11008, or a model: {sorted(MODEL_CONFIGS)}"
        )
    shape = tuple(int(x) for x in token.split("x"))
    if any(s <= 0 for s in shape):
        raise ValueError(f"bad shape {token!r}: sizes must be positive")
    return token, [shape]


SIZE_PRESETS = {
    # CI: must finish in seconds on a 2-core CPU.
    "tiny": ["4096", "512x1024", "llama-tiny"],
    # CPU default.
    "small": ["4096", "1024x4096", "4096x4096"],
    # GPU default: the real shapes and two whole models.
    "full": ["4096", "4096x4096", "4096x11008", "32000x4096", "128256x4096", "llama7b",
             "llama3-8b"],
}


def numel_of(shapes: Sequence[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


def fewest_bytes(op: str, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> int:
    """The fewest bytes ``op`` must move for these parameters (see the module docstring)."""
    es = torch.empty((), dtype=dtype).element_size()
    total = 0
    for s in shapes:
        n = math.prod(s)
        if op == "lomo_update":
            total += 3 * es * n
        elif op == "adalomo_update":
            total += (6 * es * n) if len(s) >= 2 else (5 * es + 12) * n
        else:
            raise ValueError(f"no byte count for op {op!r}")
    return total



def make_params(shapes, dtype, device, *, p_std=0.02, g_std=1.0, seed=0):
    """Fresh random parameters and gradients (plain leaf tensors), never zeros."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params, grads = [], []
    for s in shapes:
        params.append(torch.randn(s, generator=gen, device=device).mul_(p_std).to(dtype))
        grads.append(torch.randn(s, generator=gen, device=device).mul_(g_std).to(dtype))
    return params, grads


def memory_needed(shapes, dtype) -> int:
    """Bytes a case needs before anything runs: parameters + gradients + 1 GiB. An
    implementation that needs more (the references' fp32 temporaries, a foreach optimizer's
    whole-list intermediates) and runs out of memory gets a "failed: OutOfMemoryError" note in
    its row; the others are still measured."""
    es = torch.empty((), dtype=dtype).element_size()
    return 2 * numel_of(shapes) * es + 2**30
