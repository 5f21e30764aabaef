"""Model shapes and construction: Llama-shaped configs (public numbers only, no weights), built on
the meta device and materialised in the target dtype on the target device; FSDP2 sharding;
activation checkpointing."""

from __future__ import annotations

import contextlib
import importlib

import torch

from .demo_data import ByteTokenizer

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


def transformers_module():
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError(
            "lomo_kernels.finetune needs Hugging Face transformers for the model: "
            "pip install 'lomo_kernels[finetune]'"
        ) from exc


def llama_num_params(cfg: dict, vocab_size: int | None = None) -> int:
    """Parameter count of the Llama shape ``cfg`` (MODEL_CONFIGS entry) without building it."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    v = cfg.get("vocab_size") or vocab_size or ByteTokenizer.vocab_size
    hd = cfg.get("head_dim") or h // heads
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * i + 2 * h
    return v * h * (1 if cfg.get("tie_word_embeddings") else 2) + n * per_layer + h


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
    transformers = transformers_module()
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


def decoder_layers(model):
    """The decoder layers of a Hugging Face causal LM (``model.model.layers``: Llama, Mistral,
    Qwen, Gemma, SmolLM, ...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers to shard with FSDP2")
    return layers


def shard_model(model) -> None:
    """FSDP2: ``fully_shard`` every decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)


def causal_lm_class(config):
    """The ``AutoModelForCausalLM`` class of ``config`` (``LlamaForCausalLM`` for Llama)."""
    transformers = transformers_module()
    mapping = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return mapping[type(config)]
    except KeyError:
        raise ValueError(f"{type(config).__name__} is not the configuration of a causal "
                         "language model (AutoModelForCausalLM)") from None


def build_model(config, *, dtype: torch.dtype = torch.float32, device="cpu", meta_init: bool = True,
                gradient_checkpointing: bool = False, seed: int = 0, fsdp: bool = False):
    """A freshly initialised causal LM of ``config`` (``LlamaForCausalLM`` for the demo shapes).

    ``meta_init=True``: the module tree is built on the meta device (no memory), then every
    parameter is allocated directly in ``dtype`` on ``device`` (``to_empty``) and initialised
    there by the model's own ``_init_weights`` (normal(0, initializer_range) matrices, unit norms,
    the RoPE inverse frequencies recomputed in fp32); tied embeddings are re-tied.
    ``meta_init=False``: the ordinary construction (initialised on the host in ``dtype``, then
    moved to ``device``).
    ``fsdp=True``: sharded by ``shard_model`` over the default process group, on meta before the
    parameters are allocated (so each rank allocates and initialises its shards only).
    """
    cls = causal_lm_class(config)
    device = torch.device(device)
    torch.manual_seed(seed)
    if meta_init:
        with torch.device("meta"), default_dtype(dtype):
            model = cls(config)
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
            model = cls(config)
        model.to(device=device)
        if fsdp:
            shard_model(model)
    return prepare_for_training(model, gradient_checkpointing)


def prepare_for_training(model, gradient_checkpointing: bool = False):
    """No KV cache in training forwards; non-reentrant activation checkpointing (reentrant
    checkpointing hands a weight shared between segments its gradient in pieces, which
    in-backward updates cannot take); training mode."""
    model.config.use_cache = False
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


