"""``--model``: a pretrained causal LM and its tokenizer from a local Hugging Face folder, a
``.gguf`` file, or a Hub id.

A GGUF file is dequantised by transformers (with the ``gguf`` package) and converted once into a
Hugging Face folder (safetensors, fp32, the tokenizer) in a cache, which later runs load in
seconds: reading a GGUF file's metadata is slow in pure Python (about a minute for a 49k-token
vocabulary on a laptop core). The converted model carries no quantisation marker, so it trains
and saves like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from .errors import UsageError
from .model import build_model, prepare_for_training, transformers_module

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass
class ModelSource:
    spec: str  # what the user passed
    path: str  # a folder (local, or the GGUF conversion) or a Hub id
    hub: bool = False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cache_dir() -> str:
    """Where converted GGUF models are kept: ``$LOMO_KERNELS_CACHE``, else
    ``$XDG_CACHE_HOME/lomo_kernels``, else ``~/.cache/lomo_kernels``."""
    if os.environ.get("LOMO_KERNELS_CACHE"):
        return os.environ["LOMO_KERNELS_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lomo_kernels")


def _gguf_folder(path: str) -> str:
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_dir(), "gguf", f"{stem}-{hashlib.sha1(key).hexdigest()[:12]}")


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers reads a GGUF file three times (config, tokenizer, weights); the reader's
    metadata parse dominates, so each file is parsed once here (the reader is read-only)."""
    try:
        import gguf
    except ImportError:
        raise UsageError("--model *.gguf needs the gguf package: pip install gguf "
                         "(or pip install 'lomo_kernels[example]')") from None
    original, readers = gguf.GGUFReader, {}

    def reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def convert_gguf(path: str, *, log=print) -> str:
    """The Hugging Face folder of the GGUF file ``path`` (converted on first use, then cached)."""
    target = _gguf_folder(path)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    transformers = transformers_module()
    folder, name = os.path.split(os.path.abspath(path))
    log(f"converting {name} to a Hugging Face folder (once; cached in {target})")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(target))
    try:
        with _one_gguf_parse():
            try:
                tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
                model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
            except UsageError:
                raise
            except Exception as exc:  # noqa: BLE001 - a file transformers cannot read
                raise UsageError(f"--model {path}: cannot load this GGUF file: "
                                 f"{_first_line(exc)}") from None
        drop_quantization_marker(model)
        model.save_pretrained(work)
        tok.save_pretrained(work)
        if os.path.isdir(target):  # a half-written folder of an interrupted conversion
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work)
    return target


def drop_quantization_marker(model) -> None:
    """A model dequantised from GGUF keeps transformers' GGUF quantizer, which refuses
    ``save_pretrained``; its weights are plain tensors, so the marker goes."""
    model.hf_quantizer = None
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")


def resolve(spec: str, *, log=print) -> ModelSource:
    """Where ``--model spec`` is: a folder with config.json (or one .gguf file), a .gguf file, or
    a Hub id ("owner/name", tried only when no such path exists)."""
    if os.path.isfile(spec):
        if not spec.endswith(".gguf"):
            raise UsageError(f"--model {spec}: a file must be a .gguf model; otherwise pass "
                             "the folder with config.json")
        return ModelSource(spec, convert_gguf(spec, log=log))
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "config.json")):
            if not any(os.path.exists(os.path.join(spec, f)) for f in WEIGHT_FILES):
                raise UsageError(f"--model {spec}: no weights (model.safetensors or "
                                 "pytorch_model.bin) in the folder")
            return ModelSource(spec, spec)
        ggufs = sorted(f for f in os.listdir(spec) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, convert_gguf(os.path.join(spec, ggufs[0]), log=log))
        raise UsageError(f"--model {spec}: no config.json in the folder"
                         + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else ""))
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")):
        return ModelSource(spec, spec, hub=True)
    raise UsageError(f"--model {spec}: no such file or folder")


def _load_error(source: ModelSource, what: str, exc: BaseException) -> UsageError:
    hint = " (a Hub id needs a network; offline, pass a local folder)" if source.hub else ""
    return UsageError(f"--model {source.spec}: cannot load the {what}{hint}: {_first_line(exc)}")


def load_tokenizer(source: ModelSource):
    transformers = transformers_module()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(source.path)
    except Exception as exc:  # noqa: BLE001
        raise _load_error(source, "tokenizer", exc) from None
    return tok


def load_config(source: ModelSource, attn_implementation: str):
    transformers = transformers_module()
    try:
        config = transformers.AutoConfig.from_pretrained(source.path)
    except Exception as exc:  # noqa: BLE001
        raise _load_error(source, "config", exc) from None
    config._attn_implementation = attn_implementation
    return config


def _from_pretrained(source: ModelSource, dtype, attn_implementation):
    transformers = transformers_module()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dtype, attn_implementation=attn_implementation)
    except Exception as exc:  # noqa: BLE001
        raise _load_error(source, "model", exc) from None
    drop_quantization_marker(model)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def load_model(source: ModelSource, *, dtype: torch.dtype, device, attn_implementation: str,
               gradient_checkpointing: bool = False):
    """The pretrained model in ``dtype`` on ``device``, ready to train (tied embeddings tied)."""
    model = _from_pretrained(source, dtype, attn_implementation).to(device)
    return prepare_for_training(model, gradient_checkpointing)


def load_sharded(source: ModelSource, *, dtype: torch.dtype, device, attn_implementation: str,
                 gradient_checkpointing: bool = False, rank: int = 0):
    """FSDP2: the model built on meta and sharded (``build_model``), then the pretrained weights
    loaded by rank 0 and scattered into every rank's shards (only rank 0 holds a full copy, on
    the host, while loading)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    config = load_config(source, attn_implementation)
    model = build_model(config, dtype=dtype, device=device, meta_init=True, fsdp=True,
                        gradient_checkpointing=gradient_checkpointing)
    full = _from_pretrained(source, dtype, attn_implementation).state_dict() if rank == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=True))
    del full
    return model
