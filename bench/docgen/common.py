"""What every generator shares: the results files, read once, and the line naming where a number
was measured."""

from __future__ import annotations

import json
from pathlib import Path

from bench import summary

CPU = "bench/results/cpu"
GIB, MIB = 2**30, 2**20


class MissingResults(Exception):
    pass


class Results:
    """The results files under one repository root, read once each."""

    def __init__(self, root: Path):
        self.root, self._cache = root, {}

    def path(self, rel: str) -> Path:
        p = self.root / rel
        if not p.exists():
            raise MissingResults(f"{rel}: results file missing")
        return p

    def __call__(self, rel: str) -> dict:
        if rel not in self._cache:
            self._cache[rel] = json.loads(self.path(rel).read_text())
        return self._cache[rel]


def command(script: str, argv: list[str]) -> str:
    """The command line that reproduces a run: ``script`` with its recorded ``argv``, less
    ``--out`` (where the run wrote is not part of what reproduces it)."""
    argv = list(argv)
    if "--out" in argv:
        del argv[argv.index("--out"):argv.index("--out") + 2]
    return " ".join([f"python {script}", *argv])


def source(env: dict, command: str, load: str | None = None) -> str:
    """The line with every table: machine, load, commit, and the command that measured it.
    ``load`` replaces the environment's own load reading where the file has better ones."""
    machine = summary._machine(env)
    if load is not None:
        machine = machine[:machine.index(", load average")] + f", load average {load}"
    return f"Measured on {machine}.\n`{command}`"
