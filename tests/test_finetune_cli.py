"""``python -m lomo_kernels.finetune --model ... --data ...`` end to end on a tiny checkpoint the
tests write themselves (a random 2-layer Llama and a real BPE tokenizer with a chat template):
training, masks, the saved model, resume, config files, the Python data API."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import finetune_fixtures as ff  # noqa: E402
from lomo_kernels import finetune as ft  # noqa: E402
from lomo_kernels.finetune import data as fd  # noqa: E402
from lomo_kernels.finetune.batches import eval_batches  # noqa: E402
from lomo_kernels.finetune.evaluate import eval_loss  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {
        "model": ff.make_checkpoint(root / "tiny"),
        "pc": ff.write_jsonl(root / "pc.jsonl", ff.pc_rows(64)),
        "pc_eval": ff.write_jsonl(root / "pc_eval.jsonl", ff.pc_rows(16, 80)),
        "chat": ff.write_jsonl(root / "chat.jsonl", ff.chat_rows(40)),
    }


def _args(files, data="pc", *extra):
    return ["--model", files["model"], "--data", files[data], "--threads", "1", "--quiet",
            "--batch-size", "8", "--lr", "0.02", *extra]


def _weights(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_prompt_completion_trains_saves_and_reloads(files, tmp_path):
    out = tmp_path / "out"
    s = ft.main(_args(files, "pc", "--eval-data", files["pc_eval"], "--steps", "16",
                      "--output-dir", str(out), "--eval-generate", "--eval-steps", "8"))
    assert s["finite"] and s["steps"] == 16 and s["model"] == files["model"]
    assert s["last_loss_avg"] < s["first_loss"] - 0.5, s["losses"]
    assert s["eval_loss_end"] < s["eval_loss_start"] - 0.5
    assert [e["step"] for e in s["evals"]] == [8]
    assert s["data"] == {"format": "prompt_completion", "rows": 64, "truncated": 0,
                         "dropped": 0, "train_sequences": 64, "eval_rows": 16,
                         "eval_truncated": 0, "eval_dropped": 0}
    assert s["exact_match_n"] == 16 and 0 <= s["exact_match_after"] <= 1
    assert len(s["samples_after"]) == 3
    # the folder: transformers reloads it (tied embeddings still tied) to the same eval loss
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["eval_loss_end"] == s["eval_loss_end"] and summary["losses"] == s["losses"]
    assert summary["versions"]["torch"] == torch.__version__
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.chat_template == ff.CHATML
    held = fd.encode(fd.read_rows(files["pc_eval"]), fd.Encoder(tok), 1024, "x").examples
    again = eval_loss(model, eval_batches(held, 8, tok.pad_token_id, "cpu"))
    assert again == pytest.approx(s["eval_loss_end"], rel=1e-6, abs=0)
    before = transformers.AutoModelForCausalLM.from_pretrained(files["model"])
    assert not torch.equal(before.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_chat_data_trains_on_assistant_turns(files):
    s = ft.main(_args(files, "chat", "--eval-fraction", "0.25", "--steps", "12",
                      "--optimizer", "lomo", "--lr", "0.05"))
    assert s["data"]["format"] == "chat" and s["data"]["rows"] == 30
    assert s["data"]["eval_rows"] == 10
    assert s["last_loss_avg"] < s["first_loss"] - 0.5, s["losses"]
    assert s["eval_loss_end"] < s["eval_loss_start"]


def test_python_datasets_packing_and_epochs(files):
    rows = datasets.Dataset.from_list(ff.pc_rows(48))
    s = ft.main(["--model", files["model"], "--threads", "1", "--quiet", "--batch-size", "4",
                 "--packing", "--seq-len", "32", "--epochs", "2", "--optimizer", "adamw",
                 "--lr", "3e-3"],
                train_dataset=rows, eval_dataset=ff.pc_rows(8, 80))
    per_epoch = -(-s["data"]["train_sequences"] // 4)
    assert s["data"]["train_sequences"] < 48 and s["steps"] == 2 * per_epoch
    assert s["epochs"] == pytest.approx(2.0)
    assert s["eval_loss_end"] < s["eval_loss_start"]


def test_text_data_and_adamw_accumulation(files, tmp_path):
    text = ff.write_jsonl(tmp_path / "t.jsonl", [{"text": p + c} for p, c in ff.pairs(32)])
    s = ft.main(["--model", files["model"], "--data", text, "--threads", "1", "--quiet",
                 "--batch-size", "4", "--gradient-accumulation-steps", "2", "--steps", "6",
                 "--optimizer", "adamw", "--lr", "3e-3"])
    assert s["data"]["format"] == "text" and s["gradient_accumulation_steps"] == 2
    assert s["epochs"] == pytest.approx(12 / 8) and s["finite"]
    assert s["last_loss"] < s["first_loss"]


@pytest.mark.parametrize("optimizer", ["adalomo", "adamw"])
def test_resume_equals_the_uninterrupted_run_bitwise(files, tmp_path, optimizer):
    flags = _args(files, "pc", "--eval-data", files["pc_eval"], "--steps", "6",
                  "--optimizer", optimizer, "--schedule", "cosine", "--warmup-steps", "2")
    if optimizer == "adalomo":  # the clipping coefficient is optimizer state too
        flags += ["--clip-grad-norm", "1.0", "--clip-mode", "previous"]
    straight = ft.main(flags + ["--output-dir", str(tmp_path / "a"), "--save-steps", "4"])
    assert (tmp_path / "a" / "checkpoint-4" / "optimizer.pt").is_file()
    resumed = ft.main(flags + ["--output-dir", str(tmp_path / "b"),
                               "--resume", str(tmp_path / "a" / "checkpoint-4")])
    assert resumed["losses"] == straight["losses"] and resumed["lrs"] == straight["lrs"]
    assert resumed["eval_loss_end"] == straight["eval_loss_end"]
    assert resumed["eval_loss_start"] == straight["eval_loss_start"]
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the output folder resumes from its latest checkpoint
    again = ft.main(flags + ["--resume", str(tmp_path / "a")])
    assert again["losses"] == straight["losses"]


def test_demo_resume_equals_the_uninterrupted_run_bitwise(tmp_path):
    flags = ["--quiet", "--steps", "5", "--seq-len", "32", "--batch-size", "4",
             "--eval-batches", "1"]
    straight = ft.main(flags + ["--output-dir", str(tmp_path / "a"), "--save-steps", "2"])
    resumed = ft.main(flags + ["--output-dir", str(tmp_path / "b"),
                               "--resume", str(tmp_path / "a" / "checkpoint-2")])
    assert resumed["losses"] == straight["losses"]
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_config_file_equals_flags(files, tmp_path):
    yaml = pytest.importorskip("yaml")
    flags = ["--steps", "4", "--eval-data", files["pc_eval"], "--schedule", "linear",
             "--train-on-prompt", "--seq-len", "24"]
    by_flags = ft.main(_args(files, "pc", *flags))
    config = {"model": files["model"], "data": files["pc"], "threads": 1, "quiet": True,
              "batch_size": 8, "lr": 0.5, "steps": 4, "eval-data": files["pc_eval"],
              "schedule": "linear", "train_on_prompt": True, "seq_len": 24,
              "gradient_checkpointing": False}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "c.json").write_text(json.dumps(config))
    for name in ("c.yaml", "c.json"):
        by_config = ft.main(["--config", str(tmp_path / name), "--lr", "0.02"])  # flags win
        assert by_config["lr"] == 0.02
        assert by_config["losses"] == by_flags["losses"], name
        assert by_config["eval_loss_end"] == by_flags["eval_loss_end"]


def test_the_docs_say_what_example_stands_for():
    import re
    from pathlib import Path

    from lomo_kernels.finetune.cli import _mapping_argv, build_parser
    from lomo_kernels.finetune.tasks import EXAMPLE

    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "finetune.md").read_text()
                    .split())
    said = re.search(r"`--example` stands for `--model <the GGUF file> ([^`]*)`", text).group(1)
    parser = build_parser()
    assert parser.parse_args(said.split()) == parser.parse_args(_mapping_argv(parser, EXAMPLE, "x"))
