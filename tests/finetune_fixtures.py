"""A tiny pretrained-style checkpoint written by the tests themselves (no network): a random
small Llama saved with ``save_pretrained`` and a real byte-level BPE tokenizer trained with the
``tokenizers`` library, with a ChatML chat template; and small JSON Lines data sets."""

from __future__ import annotations

import json
import os

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def pairs(n: int, offset: int = 0) -> list:
    """Prompt/completion pairs ``offset .. offset + n - 1`` of a swap rule: 100 distinct pairs
    (0..79 for training and 80..99 held out, say)."""
    assert offset + n <= 100, "there are 100 distinct pairs"
    out = []
    for i in range(offset, offset + n):
        a, b = WORDS[i % 10], WORDS[(i // 10 + i + 1) % 10]
        out.append((f"swap {a} {b} ->", f" {b} {a}"))
    return out


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def pc_rows(n: int, offset: int = 0) -> list:
    return [{"prompt": p, "completion": c} for p, c in pairs(n, offset)]


def chat_rows(n: int, offset: int = 0) -> list:
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": p},
                          {"role": "assistant", "content": c.strip()},
                          {"role": "user", "content": "again"},
                          {"role": "assistant", "content": c.strip()}]}
            for p, c in pairs(n, offset)]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [p + c for p, c in pairs(100)] * 2 + ["Be brief. again system user assistant"] * 5
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                   eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def make_checkpoint(folder, *, tie: bool = True, seed: int = 0) -> str:
    """A random 2-layer Llama (hidden 64) and the tokenizer above, saved in ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tie,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
