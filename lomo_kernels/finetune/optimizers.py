"""Optimizer construction (AdaLomo, Lomo, GoLore, GaLore, AdamW for comparison), the learning-rate
schedule, and the optimizer's state size."""

from __future__ import annotations

import fnmatch
import inspect
import math

import torch

from ..optim import AdaLomo, GaLore, GoLore, Lomo
from .errors import UsageError

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
#: Default learning rates with --model (fine-tuning pretrained weights): AdaLomo's measured on
#: the packaged example (SmolLM2-135M-Instruct on the dates task: 5e-3 trains but spikes early,
#: 3e-3 with a short warm-up does not); Lomo's is the LOMO paper's SGD rate; AdamW's a common
#: full fine-tuning rate, and GoLore/GaLore's AdamW's over their 0.25 update scale.
FINETUNE_LR = {"adalomo": 3e-3, "lomo": 1e-2, "golore": 4e-5, "galore": 4e-5, "adamw": 1e-5}
SCHEDULES = ("constant", "cosine", "linear")


def make_optimizer(name: str, model, lr: float, *, backend: str = "auto", clip_grad_norm=None,
                   clip_grad_value=None, weight_decay: float = 0.0, rounding: str | None = None,
                   seed: int = 0, fused_adamw: bool | None = None, rank: int = 16,
                   update_proj_gap: int = 50, golore_scale: float = 0.25, svd_steps: int = 0,
                   clip_mode: str = "exact", accumulation_steps: int = 1):
    """The optimizer ``name`` over ``model``'s parameters. ``accumulation_steps > 1``: the
    in-backward optimizers accumulate that many backward passes per ``step()`` (passed as
    ``accumulation_steps``; refused with a clear error where the optimizer cannot)."""
    clip_mode = clip_mode if clip_grad_norm is not None else "exact"
    extra = accumulation_kwargs(name, accumulation_steps)
    if name in ("golore", "galore"):
        if clip_grad_value:
            raise UsageError(f"{name}: --clip-grad-value is not supported (the gradient is "
                             "projected before any element-wise step); use --clip-grad-norm")
        cls = GoLore if name == "golore" else GaLore
        names = [n for n, _ in model.named_parameters()]  # a tied head is not a parameter of its own
        exclude = [pat for pat in GOLORE_EXCLUDE if any(fnmatch.fnmatch(n, pat) for n in names)]
        return cls(model, lr=lr, rank=rank, update_proj_gap=update_proj_gap, scale=golore_scale,
                   svd_steps=svd_steps, clip_grad_norm=clip_grad_norm, weight_decay=weight_decay,
                   exclude=exclude, backend=backend, rounding=rounding, seed=seed,
                   clip_mode=clip_mode, **extra)
    if name in ("adalomo", "lomo"):
        cls = AdaLomo if name == "adalomo" else Lomo
        return cls(model, lr=lr, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
                   weight_decay=weight_decay, backend=backend, rounding=rounding, seed=seed,
                   clip_mode=clip_mode, **extra)
    if name == "adamw":
        dev = next(model.parameters()).device
        if fused_adamw is None:
            fused_adamw = dev.type == "cuda"
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                 fused=fused_adamw or None)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def accumulation_kwargs(name: str, steps: int) -> dict:
    """The in-backward optimizers' keyword for gradient accumulation over ``steps`` backward
    passes: ``{"accumulation_steps": steps}`` where the optimizer takes it, else a UsageError.
    (AdamW accumulates in ``.grad`` as usual: nothing to pass.)"""
    if steps == 1 or name == "adamw":
        return {}
    cls = {"adalomo": AdaLomo, "lomo": Lomo, "golore": GoLore, "galore": GaLore}[name]
    if "accumulation_steps" not in inspect.signature(cls).parameters:
        raise UsageError(f"--gradient-accumulation-steps {steps}: {cls.__name__} updates each "
                         "parameter inside the backward pass and cannot accumulate gradients "
                         "over micro-batches in this version; use --gradient-accumulation-steps "
                         "1 with a larger --batch-size (and --gradient-checkpointing), or "
                         "--optimizer adamw")
    # (exact --clip-grad-norm needs no second pass here: the optimizer clips the accumulated
    # gradient at step(), docs/accumulation.md)
    return {"accumulation_steps": steps}


def optimizer_state_bytes(opt) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (moments, factors,
    projectors, step counters)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v))


def lr_at(step: int, lr: float, total_steps: int, schedule: str = "constant",
          warmup_steps: int = 0) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``warmup_steps``, then
    constant, cosine (down to 10% at ``total_steps``) or linear (down to 0 at ``total_steps``)."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    frac = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    if schedule == "linear":
        return lr * (1.0 - frac)
    return lr
