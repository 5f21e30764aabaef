"""docs/huggingface.md runs as written: its Python blocks, in order, in one namespace."""

import re
import warnings
from pathlib import Path

import pytest
import torch

import lomo_kernels

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

DOC = Path(__file__).resolve().parents[1] / "docs" / "huggingface.md"


def python_blocks(text: str) -> list:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


@pytest.mark.slow  # about 30 s on a shared 2-core machine (the Trainer and accelerate set-up)
@pytest.mark.usefixtures("one_thread")  # a tiny model: one thread is faster on a shared CPU
def test_the_trainer_recipe_runs_as_written(tmp_path, monkeypatch):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)  # the recipe's output_dir "out"
    ns = {}
    exec(compile(blocks[0], f"{DOC}:recipe", "exec"), ns)
    trainer = ns["trainer"]
    assert trainer.state.global_step == 20
    assert trainer.args.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 4 and logged[-1]["loss"] < logged[0]["loss"] - 0.5, logged
    assert all(e["grad_norm"] > 0 for e in logged)  # the optimizer's norm, not the Trainer's 0
    with warnings.catch_warnings():
        # a new model: no optimizer is replaced, so no OptimizerReplacedWarning
        warnings.simplefilter("error", lomo_kernels.OptimizerReplacedWarning)
        exec(compile(blocks[1], f"{DOC}:without-helper", "exec"), ns)
    assert type(ns["trainer"].optimizer).__name__ == "AdaLomo"
