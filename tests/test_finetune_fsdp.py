"""``torchrun ... -m lomo_kernels.finetune --fsdp --model ...`` on 2 CPU ranks (gloo): the
pretrained weights reach the shards, the consolidated save_pretrained folder reloads with
transformers, DCP checkpoints resume bitwise, and GoLore trains the shards as one process would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

import finetune_fixtures as ff  # noqa: E402
from lomo_kernels.finetune import data as fd  # noqa: E402
from lomo_kernels.finetune.batches import eval_batches  # noqa: E402
from lomo_kernels.finetune.evaluate import eval_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each torchrun launch takes 20-60 s on a shared 2-core machine


def _torchrun(*argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
           "-m", "lomo_kernels.finetune", "--fsdp", "--threads", "1", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})


def _held_out_loss(folder, eval_file):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    held = fd.encode(fd.read_rows(eval_file), fd.Encoder(tok), 1024, "x").examples
    return eval_loss(model, eval_batches(held, 4, tok.pad_token_id, "cpu"))


def test_fsdp_loads_trains_saves_and_resumes(tmp_path):
    model = ff.make_checkpoint(tmp_path / "tiny")
    train = ff.write_jsonl(tmp_path / "pc.jsonl", ff.pc_rows(32))
    held = ff.write_jsonl(tmp_path / "eval.jsonl", ff.pc_rows(8, 80))
    flags = ["--model", model, "--data", train, "--eval-data", held, "--steps", "4",
             "--batch-size", "4", "--lr", "0.02", "--quiet", "--save-steps", "2"]
    a = _torchrun(*flags, "--output-dir", str(tmp_path / "a"), "--eval-generate")
    assert a.returncode == 0, a.stderr[-4000:]
    summary = json.loads((tmp_path / "a" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["finite"]
    assert summary["exact_match_n"] == 8  # generation on shards: every rank steps in sync
    # the shards held the pretrained weights: the same held-out loss as the model unsharded
    assert summary["eval_loss_start"] == pytest.approx(_held_out_loss(model, held), rel=1e-5)
    # one consolidated folder, reloaded by transformers to the loss the run measured at the end
    assert summary["eval_loss_end"] == pytest.approx(_held_out_loss(tmp_path / "a", held),
                                                     rel=1e-5)
    assert summary["eval_loss_end"] < summary["eval_loss_start"]
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "dcp").is_dir() and (ckpt / "rng-0.pt").is_file() and (ckpt / "rng-1.pt").is_file()
    b = _torchrun(*flags, "--output-dir", str(tmp_path / "b"), "--eval-generate",
                  "--resume", str(ckpt))
    assert b.returncode == 0, b.stderr[-4000:]
    resumed = json.loads((tmp_path / "b" / "train_summary.json").read_text())
    assert resumed["losses"] == summary["losses"]
    assert resumed["exact_match_after"] == summary["exact_match_after"]
    wa = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    wb = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_fsdp_golore_trains_the_shards_like_one_process(tmp_path):
    """GoLore on 2 ranks (batch 4 each) follows the single-process run on the same global batch
    of 8: its projection is local to each row shard and drawn from the same key on every rank."""
    model = ff.make_checkpoint(tmp_path / "tiny")
    train = ff.write_jsonl(tmp_path / "pc.jsonl", ff.pc_rows(32))
    flags = ["--model", model, "--data", train, "--steps", "3", "--optimizer", "golore",
             "--rank", "4", "--lr", "0.01", "--quiet"]
    r = _torchrun(*flags, "--batch-size", "4", "--output-dir", str(tmp_path / "sharded"))
    assert r.returncode == 0, r.stderr[-4000:]
    one = subprocess.run([sys.executable, "-m", "lomo_kernels.finetune", "--threads", "1",
                          *flags, "--batch-size", "8", "--output-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert one.returncode == 0, one.stderr[-4000:]
    sharded = json.loads((tmp_path / "sharded" / "train_summary.json").read_text())
    single = json.loads((tmp_path / "one" / "train_summary.json").read_text())
    assert sharded["world_size"] == 2 and sharded["finite"]
    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-4)
