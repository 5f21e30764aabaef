"""Evaluation: held-out loss on the label tokens, and greedy generation scored by exact match."""

from __future__ import annotations

import torch

from .data import IGNORE


@torch.no_grad()
def eval_loss(model, batches: list) -> float | None:
    """Mean loss per predicted label token over ``batches`` (each batch's mean weighted by its
    number of label tokens: completion / assistant tokens when the prompt is masked)."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        n = int((b["labels"][:, 1:] != IGNORE).sum())
        if n:
            total += float(model(**b).loss) * n
            count += n
    model.train(was_training)
    return total / count if count else None


def normalise(text: str) -> str:
    """What exact match compares: the text without surrounding whitespace."""
    return text.strip()


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list, *, max_new_tokens: int, batch_size: int,
                     synced: bool = False) -> list:
    """Greedy continuations (decoded, special tokens skipped) of each example's prompt, in
    left-padded batches, stopping at EOS. ``synced``: every rank keeps stepping until all are
    done (FSDP: each forward is a collective)."""
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            width = max(len(ex.prompt_ids) for ex in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ex in enumerate(chunk):
                n = len(ex.prompt_ids)
                ids[row, width - n:] = torch.tensor(ex.prompt_ids)
                mask[row, width - n:] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 use_cache=True, synced_gpus=synced, temperature=None,
                                 top_p=None, top_k=None)
            for row in gen[:, width:]:
                out.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    return out


def exact_match(model, tokenizer, examples: list, *, max_new_tokens: int, batch_size: int,
                samples: int = 3, synced: bool = False) -> dict:
    """``{"exact_match": fraction, "n": count, "samples": [{prompt, expected, generated}]}`` over
    the examples that have an answer."""
    examples = [ex for ex in examples if ex.answer is not None]
    if not examples:
        return {"exact_match": None, "n": 0, "samples": []}
    answers = generate_answers(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, synced=synced)
    hits = [normalise(a) == normalise(ex.answer) for a, ex in zip(answers, examples)]
    shown = [{"prompt": tokenizer.decode(ex.prompt_ids, skip_special_tokens=True)[-200:],
              "expected": ex.answer, "generated": a, "match": h}
             for ex, a, h in list(zip(examples, answers, hits))[:samples]]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "samples": shown}
