"""Micro-batches: padded batches of tokenised examples in a seeded order per epoch (every rank
its own slice of each global batch), and the demo's random windows. Both streams report and
restore their position, so a resumed run sees exactly the batches the uninterrupted one would."""

from __future__ import annotations

import math
import random

import torch

from .data import IGNORE
from .demo_data import sample_batch


def collate(examples: list, pad_id: int, device) -> dict:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (-100 on padding)."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device)}


class ExampleStream:
    """An endless stream of micro-batches over ``examples``: each epoch a seeded permutation,
    cut into global batches of ``batch_size * world`` examples, of which rank ``r`` takes every
    ``world``-th from ``r``. With several ranks the epoch's order is padded (from its start) to a
    multiple of ``world``, so every rank runs the same number of forward passes."""

    def __init__(self, examples: list, batch_size: int, pad_id: int, device, *, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.examples, self.batch_size, self.pad_id, self.device = examples, batch_size, pad_id, device
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.index = 0, 0  # the next micro-batch: epoch, and batch index within it
        self._order_epoch, self._order = None, None

    def batches_per_epoch(self) -> int:
        n = math.ceil(len(self.examples) / self.world) * self.world
        return math.ceil(n / (self.batch_size * self.world))

    def _epoch_order(self) -> list:
        if self._order_epoch != self.epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            pad = (-len(order)) % self.world
            order += order[:pad]
            self._order_epoch, self._order = self.epoch, order
        return self._order

    def next(self) -> dict:
        if self.index >= self.batches_per_epoch():
            self.epoch, self.index = self.epoch + 1, 0
        order = self._epoch_order()
        span = self.batch_size * self.world
        chunk = order[self.index * span:(self.index + 1) * span]
        self.index += 1
        return collate([self.examples[i] for i in chunk[self.rank::self.world]], self.pad_id,
                       self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def epochs_done(self) -> float:
        return self.epoch + self.index / self.batches_per_epoch()


class WindowStream:
    """The demo: ``batch_size`` random windows of ``seq_len`` tokens of a token stream per
    micro-batch (the labels are the inputs; the model shifts them), every rank its own seed."""

    def __init__(self, stream: torch.Tensor, batch_size: int, seq_len: int, device, *,
                 seed: int = 0, rank: int = 0) -> None:
        self.stream, self.batch_size, self.seq_len, self.device = stream, batch_size, seq_len, device
        self.gen = torch.Generator().manual_seed(seed + 7919 * rank)

    def next(self) -> dict:
        batch = sample_batch(self.stream, self.batch_size, self.seq_len, self.gen).to(self.device)
        return {"input_ids": batch, "labels": batch}

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])

    def epochs_done(self) -> None:
        return None


def eval_batches(examples: list, batch_size: int, pad_id: int, device) -> list:
    """The held-out examples in their order, in padded batches."""
    return [collate(examples[i:i + batch_size], pad_id, device)
            for i in range(0, len(examples), batch_size)]
