"""Checkpoints (``--save-steps``, ``--resume``) and the final model (``--output-dir``).

One process: ``checkpoint-N/`` is a Hugging Face model folder (``save_pretrained``, safetensors,
and the tokenizer) plus ``optimizer.pt`` (the optimizer's ``state_dict``), ``rng.pt`` (torch's
generators and the data stream) and ``trainer_state.json`` (step, data position, history, the
flags that fix the trajectory). Resuming loads all of it into a freshly built run: on CPU the
result equals the uninterrupted run bitwise.

FSDP2: ``checkpoint-N/dcp/`` holds the sharded model and optimizer state
(``torch.distributed.checkpoint``, every rank writes its shards), ``extra.pt`` the optimizer's
non-tensor state (loss scaler, clipping coefficient), ``rng-<rank>.pt`` each rank's generators;
the final model is consolidated into one ``save_pretrained`` folder by rank 0.
"""

from __future__ import annotations

import json
import os
import re

import torch

from .errors import UsageError
from .model import causal_lm_class

STATE = "trainer_state.json"
#: Flags whose change would make a resumed run a different run.
TRAJECTORY = ("model", "model_config", "data", "task", "optimizer", "lr", "schedule",
              "warmup_steps", "batch_size", "seq_len", "gradient_accumulation_steps", "seed",
              "dtype", "train_on_prompt", "chat_template", "packing", "eval_fraction",
              "clip_grad_norm", "clip_mode", "clip_grad_value", "weight_decay", "rounding",
              "rank", "update_proj_gap", "golore_scale", "svd_steps", "fsdp")


def _rng_state(stream) -> dict:
    state = {"torch": torch.get_rng_state(), "data": stream.state_dict()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, stream) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    stream.load_state_dict(state["data"])


def save_model(model, tokenizer, folder: str) -> None:
    """``save_pretrained`` (safetensors) of an unsharded model, and the tokenizer if it has one.
    The saved config turns the KV cache back on (training runs without it), so generating with
    the saved model is as fast as with the original."""
    use_cache = model.config.use_cache
    model.config.use_cache = True
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        model.config.use_cache = use_cache
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


def save_sharded_model(model, tokenizer, folder: str, rank: int) -> None:
    """FSDP2: every rank gathers its shards into rank 0's full state dict (on the host); rank 0
    loads it into an unsharded copy of the model built on meta and saves that."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if rank != 0:
        return
    with torch.device("meta"):
        plain = causal_lm_class(model.config)(model.config)
    plain.load_state_dict(full, assign=True, strict=False)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"consolidating the FSDP model: no weights for {missing[:3]}")
    save_model(plain, tokenizer, folder)


def write_checkpoint(folder: str, *, model, tokenizer, opt, stream, trainer_state: dict,
                     fsdp: bool, rank: int) -> None:
    os.makedirs(folder, exist_ok=True)
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd},
                 checkpoint_id=os.path.join(folder, "dcp"))
        torch.save(_rng_state(stream), os.path.join(folder, f"rng-{rank}.pt"))
        if rank == 0:
            extra = opt.state_dict().get("lomo_kernels")
            torch.save(extra, os.path.join(folder, "extra.pt"))
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(folder)
    else:
        save_model(model, tokenizer, folder)
        torch.save(opt.state_dict(), os.path.join(folder, "optimizer.pt"))
        torch.save(_rng_state(stream), os.path.join(folder, "rng.pt"))
    if rank == 0:  # last: a folder with trainer_state.json is complete
        with open(os.path.join(folder, STATE), "w") as f:
            json.dump(trainer_state, f, indent=1)


def find_checkpoint(path: str) -> str:
    """``path`` itself if it is a checkpoint, else its latest complete ``checkpoint-N``."""
    if not os.path.isdir(path):
        raise UsageError(f"--resume {path}: no such folder")
    if os.path.isfile(os.path.join(path, STATE)):
        return path
    steps = [(int(m.group(1)), name) for name in os.listdir(path)
             if (m := re.fullmatch(r"checkpoint-(\d+)", name))
             and os.path.isfile(os.path.join(path, name, STATE))]
    if not steps:
        raise UsageError(f"--resume {path}: no checkpoint (a checkpoint-N folder with {STATE})")
    return os.path.join(path, max(steps)[1])


def read_state(folder: str, args) -> dict:
    """The checkpoint's trainer state, after checking it was written by the same run."""
    with open(os.path.join(folder, STATE)) as f:
        state = json.load(f)
    saved = state.get("args", {})
    for key in TRAJECTORY:
        if key in saved and saved[key] != getattr(args, key, None):
            raise UsageError(f"--resume {folder}: the checkpoint was written with "
                             f"{key}={saved[key]!r}, this run has {getattr(args, key, None)!r} "
                             "(resume with the same flags)")
    return state


def load_checkpoint(folder: str, *, model, opt, stream, fsdp: bool, rank: int) -> None:
    """Optimizer, generators and data position (and, with FSDP, the model shards) from
    ``folder``; without FSDP the model was already loaded from the folder."""
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, opt)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=os.path.join(folder, "dcp"))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        extra = torch.load(os.path.join(folder, "extra.pt"), weights_only=False)
        if extra is not None:
            opt.load_state_dict({**opt.state_dict(), "lomo_kernels": extra})
        rng_file = os.path.join(folder, f"rng-{rank}.pt")
    else:
        opt.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=False))
        rng_file = os.path.join(folder, "rng.pt")
    if not os.path.isfile(rng_file):
        raise UsageError(f"--resume {folder}: no {os.path.basename(rng_file)} (a checkpoint of "
                         "a run with a different number of ranks, or without --fsdp?)")
    _set_rng_state(torch.load(rng_file, weights_only=False), stream)
