"""An estimate of the peak memory of one training step, per optimizer, from the model's shape
alone (nothing measured): what bench_memory.py's measurements are checked against.

    P      parameter bytes
    Gmax   the largest gradient (the largest parameter, in the parameter dtype); with tied
           embeddings the shared matrix gets its gradient in two parts (the output layer's at the
           start of the backward, the embedding's at its end) and autograd holds the first until
           the second arrives: 2 * Gmax live at the end of the backward
    G      all gradients (= P)
    A      activations: with checkpointing one hidden state per layer boundary, one layer
           recomputed (its saved tensors and their gradients), and the output layer: bf16
           logits, their float32 upcast and log-softmax for the loss, and the gradients of
           those on the way back (HF's loss upcasts the logits); with the loss computed in
           chunks of positions (bench/chunked_loss.py), one chunk's logits
    S      the optimizer's persistent state

    floor-params         P
    floor-backward       P + A + G
    lk-adalomo/lk-lomo   P + A + Gmax_live + S (AdaLomo: float32 rows + columns)
    lomo_optim-lomo      P + A + 8 * n_max: float32 copies of the largest gradient and
                         parameter (the bf16 gradient is freed once copied); with tied
                         embeddings P + max(A + Gmax_live, 8 * n_max), as the shared matrix's
                         gradient is complete only when the activations are gone
    lomo_optim-adalomo   the same with 12 * n_max (float32 gradient, squared gradient / update,
                         float32 parameter) + S
    adamw (foreach)      P + max(A + G, G + 2P + P): bf16 moments (2P) and torch._foreach_sqrt's
                         parameter-sized temporaries (P) during step()
    adafactor (foreach)  P + max(A + G, G + P + S): the full-size variance estimates of every
                         matrix (row_var @ col_var, P) during step()
    lk-adalomo-acc4      P + A + Gmax_live + S + B: B the accumulation buffers, 4 bytes per
    lk-adalomo-window1   parameter (float32); lk-adalomo-acc4-bf16: 2 bytes (bf16); the
    lk-adalomo-acc4-bf16 update in step() needs nothing more (no gradient, no activations left)
    lk-golore/lk-galore  P + A + Gmax_live + S, S the float32 projector (min(m, n) x r) and two
                         Adam moments (max(m, n) x r) of every matrix with min(m, n) > r, full-size
                         float32 moments of the rest (the projection's and the randomised SVD's
                         temporaries are O((m + n) r), not counted)
    lk-golore-embfull    the same with the embeddings and the output layer at full rank (full-size
                         float32 moments); lk-golore-r64, lk-galore-r64: rank 64

The activation term is rough (a few hundred MB at seq 256); it is the same for every optimizer,
so the differences between optimizers are what the estimate predicts best.
"""

from __future__ import annotations

import math

from bench.optimizers import GOLORE


def _param_shapes(shape: dict, vocab: int) -> list[tuple[int, ...]]:
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    hd = shape.get("head_dim") or h // heads
    out = [(vocab, h)]
    for _ in range(layers):
        out += [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd),
                (inter, h), (inter, h), (h, inter), (h,), (h,)]
    out.append((h,))
    if not shape.get("tie_word_embeddings"):
        out.append((vocab, h))
    return out


def activation_bytes(shape: dict, vocab: int, seq: int, batch: int, es: int,
                     checkpointing: bool, loss_chunk: int | None = None) -> int:
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * (shape.get("head_dim")
                                         or h // shape["num_attention_heads"])
    tokens = seq * batch
    # one layer's saved tensors: norms, q/k/v, attention out, o-proj in, gate/up/act, down in
    layer = tokens * (6 * h + 2 * kv + 4 * inter) * es
    body = (layers * tokens * h * es + 2 * layer) if checkpointing else layers * layer
    # bf16 + fp32 upcast + log-softmax, + grads; chunked: one chunk's at a time
    logit_rows = min(seq, loss_chunk) * batch if loss_chunk else tokens
    logits = logit_rows * vocab * (2 * es + 2 * 4 + 2 * 4)
    return body + logits


def estimate(optimizer: str, shape: dict, *, vocab: int, seq: int, batch: int, es: int,
             checkpointing: bool, loss_chunk: int | None = None) -> dict:
    """{"total": bytes, and the parts it adds up}; see the module docstring."""
    shapes = _param_shapes(shape, vocab)
    n_max = max(math.prod(s) for s in shapes)
    P = sum(math.prod(s) for s in shapes) * es
    Gmax = n_max * es
    gmax_live = 2 * Gmax if shape.get("tie_word_embeddings") else Gmax
    A = activation_bytes(shape, vocab, seq, batch, es, checkpointing, loss_chunk)
    factored = sum(4 * (s[0] + s[1]) if len(s) == 2 else 4 * s[0] for s in shapes)
    if optimizer == "floor-params":
        return {"total": P, "params": P}
    if optimizer == "floor-backward":
        return {"total": P + A + P, "params": P, "activations": A, "gradients": P}
    if optimizer in ("lk-adalomo", "lk-lomo"):
        state = factored if optimizer.endswith("adalomo") else 0
        return {"total": P + A + gmax_live + state, "params": P, "activations": A,
                "largest_gradient": gmax_live, "state": state}
    if optimizer.startswith("lk-adalomo-"):  # accumulation buffers
        buffers = P // es * (es if optimizer.endswith("bf16") else 4)
        return {"total": P + A + gmax_live + factored + buffers, "params": P, "activations": A,
                "largest_gradient": gmax_live, "state": factored, "buffers": buffers}
    if optimizer in ("lomo_optim-lomo", "lomo_optim-adalomo"):
        state = factored if optimizer.endswith("adalomo") else 0
        fp32 = {"lomo_optim-lomo": 8, "lomo_optim-adalomo": 12}[optimizer] * n_max
        # the float32 copies replace the (freed) gradient; a tied matrix's gradient is complete
        # only at the end of the backward, when the activations are gone
        extra = max(A + gmax_live, fp32) if shape.get("tie_word_embeddings") else A + fp32
        return {"total": P + extra + state, "params": P, "activations": A,
                "largest_gradient": gmax_live, "fp32_copies": fp32, "state": state}
    if optimizer.startswith(("lk-golore", "lk-galore")):
        r = 64 if optimizer.endswith("-r64") else GOLORE["rank"]
        full = optimizer.endswith("embfull")  # vocabulary-sized matrices at full rank
        state = sum(4 * (min(s) * r + 2 * max(s) * r)
                    if len(s) == 2 and min(s) > r and not (full and vocab in s)
                    else 8 * math.prod(s) for s in shapes)
        return {"total": P + A + gmax_live + state, "params": P, "activations": A,
                "largest_gradient": gmax_live, "state": state}
    if optimizer in ("adamw", "adamw-fused", "adafactor"):
        if optimizer == "adafactor":
            state, temp = factored * es // 4, P
        else:
            state, temp = 2 * P, (P if optimizer == "adamw" else 0)
        # the backward's peak (activations + gradients), or step()'s (gradients + state + temps)
        return {"total": P + max(A + P, P + state + temp), "params": P, "activations": A,
                "gradients": P, "state": state, "step_temporaries": temp}
    return {"total": None}
