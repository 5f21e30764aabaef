"""A causal language model's loss computed over the sequence in chunks, each chunk's logits
recomputed in the backward (activation checkpointing): at most one chunk's logits, their float32
upcast and their gradient are alive at a time, instead of the whole sequence's (at a 128k
vocabulary and 2048 tokens, ~1 GiB for each float32 copy). The cost is one more forward of the
output layer (2 x tokens x hidden x vocab FLOPs).

bench_memory.py's ``--loss-chunk`` measures it; the loss equals the model's own
(``model(input_ids, labels=input_ids).loss``: mean cross-entropy of the next token, in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           reduction="sum")


def chunked_lm_loss(model, input_ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` (a transformers causal LM with ``.model`` and
    ``.lm_head``) on ``input_ids``, the output layer applied ``chunk`` positions at a time."""
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of positions, got {chunk}")
    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]
    labels = input_ids[:, 1:]
    weight = model.lm_head.weight
    total = None
    for start in range(0, hidden.shape[1], chunk):
        part = checkpoint(_chunk_loss_sum, hidden[:, start:start + chunk], weight,
                          labels[:, start:start + chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total / labels.numel()
