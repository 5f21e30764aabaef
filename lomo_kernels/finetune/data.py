"""Training data: files (JSON Lines, JSON, CSV, Parquet, read by ``datasets``) or a
``datasets.Dataset``, in one of three formats, tokenised with loss masks.

* ``{"prompt", "completion"}``: ``prompt`` tokens (the tokenizer's special tokens included) +
  ``completion`` tokens + EOS; the prompt's labels are -100 (no loss). ``--chat-template``
  renders the pair as a user and an assistant turn instead.
* ``{"messages": [{"role", "content"}, ...]}``: the tokenizer's chat template; loss on the
  assistant turns only (each turn's content and the template's end-of-turn tokens).
* ``{"text"}``: plain language modelling, loss on every token (+ EOS).

``--train-on-prompt`` puts the loss on every token of every format. Examples longer than
``--seq-len`` are truncated (counted); an example left with no label is dropped (counted).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .errors import UsageError

FORMATS = {"prompt_completion": ("prompt", "completion"), "chat": ("messages",),
           "text": ("text",)}
READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE = -100


@dataclass
class Example:
    input_ids: list
    labels: list
    prompt_ids: list | None = None  # what generation starts from (None: text, nothing to answer)
    answer: str | None = None  # the reference completion / last assistant turn


@dataclass
class Encoded:
    examples: list = field(default_factory=list)
    format: str = ""
    rows: int = 0
    truncated: int = 0
    dropped: int = 0  # no label left after truncation


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UsageError("--data needs the datasets library: pip install "
                         "'lomo_kernels[finetune]'") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _check_json_lines(path: str, flag: str) -> None:
    """A clear line-numbered message for a malformed JSON Lines file (datasets' own is Arrow's)."""
    rows = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{flag} {path}: line {number} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{flag} {path}: line {number} is a {type(row).__name__}, "
                                 "expected a JSON object")
    if not rows:
        raise UsageError(f"{flag} {path}: no rows")


def read_rows(path: str, flag: str = "--data"):
    """A ``datasets.Dataset`` of the file's rows; the reader is chosen by the extension."""
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder, expected a file "
                         f"({', '.join(sorted(READERS))})")
    ext = os.path.splitext(path)[1].lower()
    if ext not in READERS:
        raise UsageError(f"{flag} {path}: unknown file type {ext or '(no extension)'!r}; "
                         f"expected one of {', '.join(sorted(READERS))}")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{flag} {path}: no rows")
    if ext == ".jsonl":
        _check_json_lines(path, flag)
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(READERS[ext], data_files=path, split="train")
    except Exception as exc:  # noqa: BLE001 - Arrow/pandas errors: the file's fault
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{flag} {path}: cannot read it as {ext[1:]}: {detail}") from None
    if len(ds) == 0:
        raise UsageError(f"{flag} {path}: no rows")
    return ds


def as_dataset(rows, flag: str):
    """Rows given from Python (a ``datasets.Dataset``, or a list of dicts) as a Dataset."""
    datasets = _datasets()
    if isinstance(rows, datasets.Dataset):
        ds = rows
    elif isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
        ds = datasets.Dataset.from_list(rows)
    else:
        raise UsageError(f"{flag}: expected a datasets.Dataset or a list of dicts, "
                         f"got {type(rows).__name__}")
    if len(ds) == 0:
        raise UsageError(f"{flag}: no rows")
    return ds


def detect_format(columns, where: str) -> str:
    for name, needed in FORMATS.items():
        if all(c in columns for c in needed):
            return name
    raise UsageError(f"{where}: no known format in the columns {sorted(columns)}; expected "
                     "prompt + completion, messages (chat) or text")


def split_rows(ds, fraction: float, seed: int):
    """``(train, held_out)``: a seeded ``fraction`` of the rows held out (at least one)."""
    n_eval = max(1, int(round(len(ds) * fraction)))
    if n_eval >= len(ds):
        raise UsageError(f"--eval-fraction {fraction}: leaves no training rows "
                         f"(the data has {len(ds)})")
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


class Encoder:
    """Tokenises rows of one format with their loss masks."""

    def __init__(self, tokenizer, *, chat_template: bool = False, train_on_prompt: bool = False):
        self.tok = tokenizer
        self.chat_template = chat_template
        self.train_on_prompt = train_on_prompt
        eos = tokenizer.eos_token_id
        self.eos = [] if eos is None else [int(eos)]

    def _ids(self, text: str, special: bool) -> list:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _render(self, messages, generation_prompt: bool, where: str) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - no template, or the template's own error
            raise UsageError(f"{where}: the tokenizer cannot render chat messages: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from None

    def chat(self, messages, where: str) -> Example:
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in messages)):
            raise UsageError(f"{where}: 'messages' must be a non-empty list of "
                             "{\"role\": str, \"content\": str}")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise UsageError(f"{where}: no assistant message to train on")
        if not getattr(self.tok, "is_fast", False):
            raise UsageError(f"{where}: chat data needs a fast tokenizer (tokenizer.json)")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        full = self._render(messages, False, where)
        spans, prompt_text = [], None
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], True, where)
            upto = self._render(messages[:i + 1], False, where)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise UsageError(f"{where}: the chat template does not render the conversation "
                                 "turn by turn (a rendered prefix changes later), so the "
                                 "assistant turns cannot be located; use prompt/completion rows")
            spans.append((len(before), len(upto)))
            if i == last:
                prompt_text = before
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if self.train_on_prompt:
            labels = list(ids)
        else:
            labels = [t if any(a <= start < b for a, b in spans) else IGNORE
                      for t, (start, _) in zip(ids, enc["offset_mapping"])]
        prompt_ids = list(self.tok(prompt_text, add_special_tokens=False)["input_ids"])
        return Example(ids, labels, prompt_ids, messages[last]["content"])

    def prompt_completion(self, prompt, completion, where: str) -> Example:
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise UsageError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        if self.chat_template:
            return self.chat([{"role": "user", "content": prompt},
                              {"role": "assistant", "content": completion}], where)
        p = self._ids(prompt, True)
        c = self._ids(completion, False) + self.eos
        labels = (list(p) if self.train_on_prompt else [IGNORE] * len(p)) + c
        return Example(p + c, labels, p, completion)

    def text(self, text, where: str) -> Example:
        if not isinstance(text, str):
            raise UsageError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        ids = self._ids(text, True) + self.eos
        return Example(ids, list(ids))


def encode(ds, encoder: Encoder, seq_len: int, where: str) -> Encoded:
    """Every row of ``ds`` tokenised, truncated to ``seq_len`` (counted), label-less rows dropped
    (counted)."""
    fmt = detect_format(ds.column_names, where)
    out = Encoded(format=fmt, rows=len(ds))
    for i, row in enumerate(ds):
        at = f"{where}: row {i + 1}"
        if fmt == "chat":
            ex = encoder.chat(row["messages"], at)
        elif fmt == "prompt_completion":
            ex = encoder.prompt_completion(row["prompt"], row["completion"], at)
        else:
            ex = encoder.text(row["text"], at)
        if len(ex.input_ids) > seq_len:
            out.truncated += 1
            ex.input_ids, ex.labels = ex.input_ids[:seq_len], ex.labels[:seq_len]
        if not any(t != IGNORE for t in ex.labels[1:]):  # the first label is never predicted
            out.dropped += 1
            continue
        out.examples.append(ex)
    if not out.examples:
        raise UsageError(f"{where}: no example has a token to train on within --seq-len "
                         f"{seq_len} ({out.rows} rows, {out.truncated} truncated)")
    return out


def pack(examples: list, seq_len: int) -> list:
    """Examples concatenated (each ends with EOS) and cut into blocks of ``seq_len`` tokens."""
    ids = [t for ex in examples for t in ex.input_ids]
    labels = [t for ex in examples for t in ex.labels]
    blocks = [Example(ids[i:i + seq_len], labels[i:i + seq_len])
              for i in range(0, len(ids), seq_len)]
    return [b for b in blocks if any(t != IGNORE for t in b.labels[1:])]
