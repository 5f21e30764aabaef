"""The demo's data: a byte-level tokenizer and a corpus every Python installation has (the Zen of
Python and standard-library docstrings), as a token stream sampled in random windows."""

from __future__ import annotations

import codecs
import contextlib
import importlib
import inspect
import os
import warnings
from typing import Sequence

import torch


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
