"""End-to-end fine-tuning of a Llama-shaped causal LM with ``AdaLomo``, ``Lomo``, ``GoLore``,
``GaLore`` or AdamW.

    python -m lomo_kernels.finetune                       # the demo: tiny model, CPU, < 2 minutes
    python -m lomo_kernels.finetune --optimizer lomo      # fused SGD
    python -m lomo_kernels.finetune --optimizer golore    # subspace AdamW, random projections
    python -m lomo_kernels.finetune --optimizer galore --rank 32   # SVD projections
    python -m lomo_kernels.finetune --optimizer adamw     # torch.optim.AdamW, for comparison
    python -m lomo_kernels.finetune --model-config llama3-8b --dtype bf16 --device cuda \\
        --seq-len 1024 --batch-size 1 --gradient-checkpointing --steps 20
    torchrun --nproc-per-node 2 -m lomo_kernels.finetune --fsdp   # sharded over 2 ranks

The default run needs no network and no GPU: a tiny Llama-shaped model built from a config, a
byte-level tokenizer (256 byte values + BOS/EOS/PAD) and a corpus made of text every Python
installation has (the Zen of Python and the docstrings of some standard-library modules). It
prints a progress bar (loss, tokens/s) and a summary: first/last training loss, held-out loss
before and after, tokens/s, peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the
process's peak resident set from ``resource.getrusage``), the optimizer's state bytes, optimizer
and backend.

Large shapes (``--model-config 1b``, ``llama2-7b``, ``llama3-8b``, ...; the public shapes, never
any weights) are built on the meta device and materialised directly in the target dtype on the
target device (``to_empty`` + the model's own initialisation), so an 8B model in bf16 never
exists in fp32 or on the host. Attention is SDPA; ``--gradient-checkpointing`` uses
non-reentrant checkpointing (reentrant checkpointing hands a weight shared between segments its
gradient in pieces, which in-backward updates cannot take).

``--fsdp`` (under ``torchrun``): the model is sharded with FSDP2 (``fully_shard`` on every decoder
layer, then the root) over all ranks, gloo on CPU and NCCL on CUDA (one GPU per rank), before its
parameters are materialised (with meta init each rank allocates and initialises only its shards);
``--batch-size`` is per rank, every rank draws its own batches, the logged loss is the mean over
ranks and the summary (printed by rank 0) gives the largest per-rank peak memory.

On CPU the tiny/small configs run on one thread unless ``--threads`` says otherwise (their
small matrices are faster on one core than with OpenMP threads spin-waiting on a shared machine).

Function API: ``main(argv) -> dict`` (the summary), ``build_model``, ``build_config``,
``ByteTokenizer``, ``stdlib_corpus``.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import inspect
import math
import os
import resource
import sys
import time
import warnings
from typing import Sequence

import torch

from . import ops
from .optim import AdaLomo, GaLore, GoLore, Lomo

# ---------------------------------------------------------------------------------------------
# Model shapes (Llama-shaped; public configuration numbers only, no weights)
# ---------------------------------------------------------------------------------------------

#: name -> LlamaConfig keyword arguments. ``vocab_size=None``: the byte tokenizer's vocabulary.
MODEL_CONFIGS: dict[str, dict] = {
    # The CPU demo: 0.8M parameters, learns byte statistics and common words in a minute.
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=None, tie_word_embeddings=False),
    # A little larger, still CPU-sized (~9M parameters).
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=2, vocab_size=None,
                  tie_word_embeddings=False),
    # Llama-3.2-1B shape (tied embeddings, GQA): 1.24e9 parameters.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3.2-3B shape: 3.21e9 parameters.
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-2-7B: 6.74e9 parameters.
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      tie_word_embeddings=False),
    # Llama-3-8B / 3.1-8B: 8.03e9 parameters.
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      tie_word_embeddings=False, rope_theta=500000.0),
    # Llama-2-13B: 1.30e10 parameters.
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                       tie_word_embeddings=False),
    # Llama-2-70B shape (GQA): 6.90e10 parameters.
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                       tie_word_embeddings=False),
    # Llama-3-70B: 7.06e10 parameters.
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                       tie_word_embeddings=False, rope_theta=500000.0),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adalomo", "lomo", "golore", "galore", "adamw")
IN_BACKWARD = (AdaLomo, Lomo, GoLore)
#: Default learning rates (constant schedule), tuned on the tiny demo (from scratch, 200 steps):
#: AdaLomo's lr is relative (scaled by max(1e-3, rms(p)), rms(p) ~0.02 for matrices, 1 for norms);
#: 1e-2..4e-2 all train stably there (fine-tuning a pretrained model wants ~1e-3..1e-2). Lomo's
#: is plain SGD (0.2 and above oscillate or diverge); AdamW's is Adam's. GoLore/GaLore run Adam
#: in the subspace with GaLore's scale 0.25 on the low-rank update (embeddings, norms and the
#: head are full rank: see make_optimizer), so their lr is Adam's times ~1/scale.
DEFAULT_LR = {"adalomo": 2e-2, "lomo": 0.1, "golore": 1e-2, "galore": 1e-2, "adamw": 3e-3}
#: What GaLore's recipe trains at full rank: the embeddings and the output head (and every
#: parameter of fewer than two dimensions, always).
GOLORE_EXCLUDE = ("*embed_tokens*", "lm_head.weight")


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError(
            "lomo_kernels.finetune needs Hugging Face transformers for the Llama model: "
            "pip install transformers  (or: pip install 'lomo_kernels[test]')"
        ) from exc


def llama_num_params(cfg: dict, vocab_size: int | None = None) -> int:
    """Parameter count of the Llama shape ``cfg`` (MODEL_CONFIGS entry) without building it."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    v = cfg.get("vocab_size") or vocab_size or ByteTokenizer.vocab_size
    hd = cfg.get("head_dim") or h // heads
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * i + 2 * h
    return v * h * (1 if cfg.get("tie_word_embeddings") else 2) + n * per_layer + h


# ---------------------------------------------------------------------------------------------
# Tokenizer and corpus
# ---------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus BOS (256), EOS (257) and PAD (258)."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str, *, bos: bool = True, eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if bos else []) + ids + ([self.eos_token_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


#: Standard-library modules whose docstrings make the demo corpus (pure-Python modules present in
#: every CPython installation; sorted names keep the corpus deterministic for a Python version).
CORPUS_MODULES = (
    "argparse", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "enum", "fractions", "functools", "heapq", "inspect",
    "ipaddress", "json", "logging", "pathlib", "pprint", "random", "shutil", "statistics",
    "string", "tempfile", "textwrap", "typing", "unittest", "uuid", "zipfile",
)


def _zen() -> str:
    this_s = "Gur Mra bs Clguba, ol Gvz Crgref"  # the first line, in case `this` is unavailable
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # importing `this` prints the Zen
        try:
            this_s = importlib.import_module("this").s
        except Exception:  # noqa: BLE001
            pass
    return codecs.decode(this_s, "rot13")


def stdlib_corpus(min_chars: int = 200_000) -> list[str]:
    """Documents of English text from the standard library: the Zen of Python and the docstrings
    of ``CORPUS_MODULES`` (module, public classes, functions and methods). If docstrings are
    stripped (``python -OO``), the modules' source files are used instead."""
    docs = [_zen()]
    seen = set()
    with warnings.catch_warnings():  # e.g. typing's deprecated aliases warn on access
        warnings.simplefilter("ignore")
        _add_docstrings(docs, seen)
    if sum(map(len, docs)) < min_chars:  # docstrings stripped: fall back to source text
        for name in CORPUS_MODULES:
            try:
                docs.append(inspect.getsource(importlib.import_module(name)))
            except Exception:  # noqa: BLE001
                continue
    return docs


def _add_docstrings(docs: list, seen: set) -> None:
    for name in CORPUS_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a trimmed installation
            continue
        objs = [mod]
        for attr in sorted(vars(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr)
            if getattr(obj, "__module__", None) != name:
                continue
            objs.append(obj)
            if inspect.isclass(obj):
                for mattr in sorted(vars(obj)):
                    if not mattr.startswith("_"):
                        objs.append(getattr(obj, mattr, None))
        for obj in objs:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40 and doc not in seen:
                seen.add(doc)
                docs.append(inspect.cleandoc(doc))


def make_token_stream(docs: Sequence[str], tokenizer: ByteTokenizer, held_out: float = 0.05):
    """(train, held-out) 1-d int64 token tensors: documents in a fixed shuffled order, the last
    ``held_out`` fraction of documents held out."""
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(1234)).tolist()
    n_eval = max(1, int(len(docs) * held_out))
    chunks = [tokenizer.encode(docs[i]) for i in order]
    train = [t for c in chunks[n_eval:] for t in c]
    evals = [t for c in chunks[:n_eval] for t in c]
    return torch.tensor(train, dtype=torch.long), torch.tensor(evals, dtype=torch.long)


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    """``batch_size`` random windows of ``seq_len`` tokens (the model shifts labels itself)."""
    if stream.numel() < seq_len + 1:
        reps = (seq_len + 1) // max(1, stream.numel()) + 1
        stream = stream.repeat(reps)
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_config(name: str | dict = "tiny", *, vocab_size: int | None = None,
                 max_position_embeddings: int = 4096, attn_implementation: str = "sdpa",
                 **overrides):
    """A ``transformers.LlamaConfig`` of the shape ``name`` (MODEL_CONFIGS) or a dict of kwargs."""
    transformers = _transformers()
    if isinstance(name, dict):
        kwargs = dict(name)
    else:
        if name not in MODEL_CONFIGS:
            raise ValueError(
                f"unknown model config {name!r}; choose one of {sorted(MODEL_CONFIGS)}"
            )
        kwargs = dict(MODEL_CONFIGS[name])
    kwargs.update(overrides)
    if kwargs.get("vocab_size") is None:
        kwargs["vocab_size"] = vocab_size or ByteTokenizer.vocab_size
    theta = kwargs.pop("rope_theta", 10000.0)
    cfg = transformers.LlamaConfig(
        **kwargs,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_id=ByteTokenizer.eos_token_id,
        pad_token_id=ByteTokenizer.pad_token_id,
        use_cache=False,
        attn_implementation=attn_implementation,
    )
    # transformers >= 5 keeps rope_theta in rope_parameters; older versions as an attribute
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = theta
    else:
        cfg.rope_theta = theta
    cfg._attn_implementation = attn_implementation
    return cfg


def shard_model(model) -> None:
    """FSDP2: ``fully_shard`` every decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def build_model(config, *, dtype: torch.dtype = torch.float32, device="cpu", meta_init: bool = True,
                gradient_checkpointing: bool = False, seed: int = 0, fsdp: bool = False):
    """A freshly initialised ``LlamaForCausalLM``.

    ``meta_init=True``: the module tree is built on the meta device (no memory), then every
    parameter is allocated directly in ``dtype`` on ``device`` (``to_empty``) and initialised
    there by the model's own ``_init_weights`` (normal(0, initializer_range) matrices, unit norms,
    the RoPE inverse frequencies recomputed in fp32); tied embeddings are re-tied.
    ``meta_init=False``: the ordinary construction (initialised on the host in ``dtype``, then
    moved to ``device``).
    ``fsdp=True``: sharded by ``shard_model`` over the default process group, on meta before the
    parameters are allocated (so each rank allocates and initialises its shards only).
    """
    transformers = _transformers()
    device = torch.device(device)
    torch.manual_seed(seed)
    if meta_init:
        with torch.device("meta"), default_dtype(dtype):
            model = transformers.LlamaForCausalLM(config)
        if fsdp:
            shard_model(model)
        model.to_empty(device=device)
        for m in model.modules():  # nothing was initialised on meta: make sure nothing is skipped
            if hasattr(m, "_is_hf_initialized"):
                del m._is_hf_initialized
        for t in list(model.parameters()) + list(model.buffers()):
            if hasattr(t, "_is_hf_initialized"):
                del t._is_hf_initialized
        with torch.no_grad():  # the random draws happen on ``device`` (seeded above)
            if hasattr(model, "initialize_weights"):
                model.initialize_weights()
            else:  # older transformers
                model.apply(model._init_weights)
        model.tie_weights()
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_meta:
                raise RuntimeError(f"build_model: {name} is still on the meta device")
    else:
        # built in ``dtype`` (the RoPE inverse frequencies stay fp32, as from_pretrained keeps
        # them; a later .to(dtype) would round them), then moved
        with default_dtype(dtype):
            model = transformers.LlamaForCausalLM(config)
        model.to(device=device)
        if fsdp:
            shard_model(model)
    model.config.use_cache = False
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


def make_optimizer(name: str, model, lr: float, *, backend: str = "auto", clip_grad_norm=None,
                   clip_grad_value=None, weight_decay: float = 0.0, rounding: str = "nearest",
                   seed: int = 0, fused_adamw: bool | None = None, rank: int = 16,
                   update_proj_gap: int = 50, golore_scale: float = 0.25, svd_steps: int = 0,
                   clip_mode: str = "exact"):
    clip_mode = clip_mode if clip_grad_norm is not None else "exact"
    if name in ("golore", "galore"):
        if clip_grad_value:
            raise ValueError(f"{name}: --clip-grad-value is not supported (the gradient is "
                             "projected before any element-wise step); use --clip-grad-norm")
        cls = GoLore if name == "golore" else GaLore
        return cls(model, lr=lr, rank=rank, update_proj_gap=update_proj_gap, scale=golore_scale,
                   svd_steps=svd_steps, clip_grad_norm=clip_grad_norm, weight_decay=weight_decay,
                   exclude=GOLORE_EXCLUDE, backend=backend, rounding=rounding, seed=seed,
                   clip_mode=clip_mode)
    if name in ("adalomo", "lomo"):
        cls = AdaLomo if name == "adalomo" else Lomo
        return cls(model, lr=lr, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
                   weight_decay=weight_decay, backend=backend, rounding=rounding, seed=seed,
                   clip_mode=clip_mode)
    if name == "adamw":
        dev = next(model.parameters()).device
        if fused_adamw is None:
            fused_adamw = dev.type == "cuda"
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                 fused=fused_adamw or None)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def optimizer_state_bytes(opt) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (moments, factors,
    projectors, step counters)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v))


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lomo_kernels.finetune",
        description="Fine-tune a Llama-shaped causal LM with AdaLomo / Lomo / GoLore / GaLore "
        "(in-backward updates) "
        "or AdamW. The defaults train a tiny model on CPU in about 30 seconds.",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adalomo")
    p.add_argument("--backend", choices=ops.BACKENDS, default="auto",
                   help="update kernels of Lomo/AdaLomo/GoLore/GaLore (ignored by adamw)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default per optimizer: {DEFAULT_LR})")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="lr schedule after --warmup-steps of linear warm-up (cosine: down to 10%%)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--clip-grad-norm", type=float, default=None,
                   help="global L2-norm clipping (in-backward optimizers: two backward passes per step, "
                        "or one with --clip-mode previous)")
    p.add_argument("--clip-mode", choices=["exact", "previous"], default="exact",
                   help="in-backward clipping: exact (grad_norm + fused_backward) or previous "
                        "(one backward, clipped with the previous step's norm)")
    p.add_argument("--clip-grad-value", type=float, default=None)
    p.add_argument("--rank", type=int, default=16, help="GoLore/GaLore subspace rank")
    p.add_argument("--update-proj-gap", type=int, default=50,
                   help="GoLore/GaLore: steps between projector refreshes")
    p.add_argument("--golore-scale", type=float, default=0.25,
                   help="GoLore/GaLore: scale of the back-projected update")
    p.add_argument("--svd-steps", type=int, default=0,
                   help="GoLore: SVD projections for the first N steps, random after")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="parameter dtype")
    p.add_argument("--rounding", choices=ops.ROUNDINGS, default="nearest",
                   help="rounding of bf16/fp16 parameters (in-backward optimizers)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default="tiny")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="non-reentrant activation checkpointing of every decoder layer")
    p.add_argument("--no-meta-init", dest="meta_init", action="store_false",
                   help="build the model on the host instead of meta-device init")
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--eval-batches", type=int, default=4,
                   help="held-out batches evaluated before and after training (0: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1 for the tiny/small configs, whose "
                   "small matrices run faster on one thread than with OpenMP spin-waits on a "
                   "shared machine; torch's default otherwise; 0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary print")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the model with FSDP2 over the ranks torchrun launched (gloo on CPU, "
                   "NCCL on CUDA); --batch-size is per rank")
    return p.parse_args(argv)


@torch.no_grad()
def _eval_loss(model, batches) -> float | None:
    if not batches:
        return None
    was_training = model.training
    model.eval()
    losses = [float(model(input_ids=b, labels=b).loss) for b in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def _lr_at(step: int, args) -> float:
    """Learning rate of step ``step`` (0-based)."""
    if args.warmup_steps and step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.schedule == "cosine":
        span = max(1, args.steps - args.warmup_steps)
        frac = min(1.0, (step - args.warmup_steps) / span)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    return args.lr


def main(argv: Sequence[str] | None = None) -> dict:
    """Run a fine-tuning job; returns the summary dict (also printed unless ``--quiet``)."""
    args = parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = args.fsdp and _init_distributed(device)
    if args.fsdp and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    threads = args.threads
    if threads is None and device.type == "cpu" and args.model_config in ("tiny", "small"):
        threads = 1
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        summary = _run(args, device)
        if started:  # every rank done before any tears the group down (gloo aborts a rank whose
            torch.distributed.barrier()  # peer closed its connections while it still had work)
        return summary
    finally:
        torch.set_num_threads(old_threads)
        if started:
            torch.distributed.destroy_process_group()


def _local(p):
    """The local shard of a sharded (DTensor) parameter, else the parameter."""
    return p.to_local() if hasattr(p, "to_local") else p


def _init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA: one GPU per local
    rank). Returns True when it was initialised here."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "--fsdp runs under torchrun, which starts one process per rank: "
            "torchrun --nproc-per-node N -m lomo_kernels.finetune --fsdp ..."
        )
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _mean_over_ranks(x: float, device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _max_over_ranks(x: int, device) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def _run(args, device) -> dict:
    dtype = DTYPES[args.dtype]
    if args.optimizer == "adamw":
        backend = None
    else:
        backend = ops.resolve_backend(args.backend, device)  # a clear error if it cannot run here

    t_start = time.perf_counter()
    tok = ByteTokenizer()
    train_stream, eval_stream = make_token_stream(stdlib_corpus(), tok)
    config = build_config(args.model_config, max_position_embeddings=max(4096, args.seq_len),
                          attn_implementation=args.attn_implementation)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(config, dtype=dtype, device=device, meta_init=args.meta_init,
                        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
                        fsdp=args.fsdp)
    world, rank = 1, 0
    if args.fsdp:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    n_params = sum(p.numel() for p in model.parameters())  # global sizes (sharded: DTensors)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = make_optimizer(args.optimizer, model, args.lr, backend=args.backend,
                         clip_grad_norm=args.clip_grad_norm, clip_grad_value=args.clip_grad_value,
                         weight_decay=args.weight_decay, rounding=args.rounding, seed=args.seed,
                         rank=args.rank, update_proj_gap=args.update_proj_gap,
                         golore_scale=args.golore_scale, svd_steps=args.svd_steps,
                         clip_mode=args.clip_mode)
    in_backward = isinstance(opt, IN_BACKWARD)

    gen = torch.Generator().manual_seed(args.seed + 7919 * rank)  # every rank its own batches
    eval_gen = torch.Generator().manual_seed(10_000 + args.seed)
    eval_batches = [sample_batch(eval_stream, args.batch_size, args.seq_len, eval_gen).to(device)
                    for _ in range(args.eval_batches)]
    eval_start = _eval_loss(model, eval_batches)

    progress = None
    quiet = args.quiet or rank != 0
    if not quiet:
        from tqdm.auto import tqdm

        progress = tqdm(total=args.steps, desc=f"{args.optimizer} {args.model_config}",
                        unit="step", dynamic_ncols=True)

    losses, lrs, grad_norms = [], [], []
    tokens_per_step = args.batch_size * args.seq_len * world
    t_train0 = time.perf_counter()
    t_after_first = None
    for step in range(args.steps):
        batch = sample_batch(train_stream, args.batch_size, args.seq_len, gen).to(device)
        lr = _lr_at(step, args)
        loss = model(input_ids=batch, labels=batch).loss
        if in_backward:
            if opt.clip_grad_norm is not None and opt.clip_mode == "exact":
                opt.grad_norm(loss)  # first pass: the global norm, no update
            opt.fused_backward(loss, lr)  # (second) pass: the update, fused into the backward
        else:
            for g in opt.param_groups:
                g["lr"] = lr
            loss.backward()
            if args.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            if args.clip_grad_value:
                torch.nn.utils.clip_grad_value_(model.parameters(), args.clip_grad_value)
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss_value = _mean_over_ranks(float(loss.detach()), device)  # one host sync per step
        if in_backward:  # (the norm is computed by then: no further wait)
            grad_norms.append(float(opt.last_grad_norm))
        losses.append(loss_value)
        lrs.append(lr)
        if step == 0:
            t_after_first = time.perf_counter()
        if progress is not None:
            elapsed = time.perf_counter() - t_train0
            tps = tokens_per_step * (step + 1) / elapsed
            extra = {"grad_norm": f"{grad_norms[-1]:.3g}"} if in_backward else {}
            progress.set_postfix(loss=f"{loss_value:.3f}", **extra, tok_s=f"{tps:,.0f}",
                                 refresh=False)
            progress.update(1)
        if not math.isfinite(loss_value):
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_end = time.perf_counter()
    if progress is not None:
        progress.close()
    eval_end = _eval_loss(model, eval_batches)

    n_steps = len(losses)
    if n_steps > 1:  # the first step (allocator warm-up, kernel compilation) is not timed
        tok_s = tokens_per_step * (n_steps - 1) / max(1e-9, t_end - t_after_first)
    else:
        tok_s = tokens_per_step * n_steps / max(1e-9, t_end - t_train0)
    k = max(1, n_steps // 10)
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        peak, peak_kind = peak_rss_bytes(), "cpu_max_rss"
    peak = _max_over_ranks(peak, device)  # the largest rank's
    summary = {
        "optimizer": args.optimizer,
        "backend": backend,
        "model_config": args.model_config,
        "n_params": n_params,
        "param_bytes": param_bytes,
        "dtype": args.dtype,
        "device": str(device),
        "lr": args.lr,
        "schedule": args.schedule,
        "steps": n_steps,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "meta_init": args.meta_init,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "first_loss_avg": sum(losses[:k]) / k if losses else None,
        "last_loss_avg": sum(losses[-k:]) / k if losses else None,
        "eval_loss_start": eval_start,
        "eval_loss_end": eval_end,
        "losses": losses,
        "lrs": lrs,
        "grad_norms": grad_norms,  # Lomo/AdaLomo: last_grad_norm of every step
        "clip_mode": args.clip_mode,
        "tokens_per_s": tok_s,
        "train_s": t_end - t_train0,
        "wall_s": time.perf_counter() - t_start,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "step_s": tokens_per_step / tok_s if tok_s else None,
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "finite": all(math.isfinite(x) for x in losses),
        "world_size": world,
        "param_bytes_per_rank": _max_over_ranks(sum(
            _local(p).numel() * p.element_size() for p in model.parameters()), device),
    }
    if not quiet:
        print(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    def f(x, spec=".4f"):
        return "n/a" if x is None else format(x, spec)

    k = max(1, s["steps"] // 10)
    lines = [
        "",
        "== lomo_kernels.finetune summary ==",
        f"model       {s['model_config']} ({s['n_params'] / 1e6:.2f}M params, {s['dtype']}, "
        f"{s['device']}{', grad ckpt' if s['gradient_checkpointing'] else ''})",
        f"optimizer   {s['optimizer']}" + (f" (backend {s['backend']})" if s["backend"] else "")
        + f", lr {s['lr']:g} {s['schedule']}",
        f"steps       {s['steps']} x {s['batch_size']} x {s['seq_len']} tokens"
        + (f" x {s['world_size']} ranks (FSDP2)" if s.get("world_size", 1) > 1 else ""),
        f"train loss  first {f(s['first_loss'])} -> last {f(s['last_loss'])} "
        f"(mean of first/last {k}: {f(s['first_loss_avg'])} -> {f(s['last_loss_avg'])})",
        f"eval loss   {f(s['eval_loss_start'])} -> {f(s['eval_loss_end'])} (held-out)",
        f"throughput  {s['tokens_per_s']:,.0f} tokens/s ({s['step_s'] * 1e3:.1f} ms/step)",
        f"opt. state  {_fmt_bytes(s['optimizer_state_bytes'])}",
        f"peak memory {_fmt_bytes(s['peak_memory_bytes'])} ({s['peak_memory_kind']}"
        + ("" if s.get("world_size", 1) == 1 else ", the largest rank's") + "); "
        f"parameters {_fmt_bytes(s['param_bytes'])}"
        + ("" if s.get("world_size", 1) == 1
           else f" ({_fmt_bytes(s['param_bytes_per_rank'])} on the largest rank)"),
        f"wall time   {s['wall_s']:.1f} s (training {s['train_s']:.1f} s)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
