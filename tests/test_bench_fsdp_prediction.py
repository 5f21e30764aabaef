"""bench/fsdp_prediction.py: the committed prediction is what the script computes today, and its
FSDP2 units are the ones counted by hand from the Llama-2-7B shape."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import fsdp_prediction as fp  # noqa: E402


def test_the_committed_prediction_is_the_scripts():
    committed = json.loads(fp.COMMITTED.read_text())
    assert committed["ranks"] == fp.RANKS and committed["seq_len"] == fp.SEQ
    assert "not measured" in committed["what"]
    assert committed["rows"] == [fp.predict(m) for m in fp.MODELS], \
        "bench/results/model/fsdp_prediction.json is stale: run python bench/fsdp_prediction.py"


def test_llama2_7b_by_hand():
    h, i, v, layers, n = 4096, 11008, 32000, 32, fp.RANKS
    layer = 4 * h * h + 3 * h * i + 2 * h  # q, k, v, o; gate, up, down; two norms
    root = 2 * v * h + h  # embeddings, output layer, final norm
    r = fp.predict("llama2-7b")
    assert r["parameters"] == layers * layer + root
    assert r["gathered"] == 2 * (2 * layer + root)
    assert r["largest_gradient_x2"] == 4 * max(layer, root)
    s, kv = 4096, 4096  # Llama-2-7B: 32 KV heads of 128
    assert r["activations"] == (layers * s * h * 2 + 2 * s * (6 * h + 2 * kv + 4 * i) * 2
                                + s * v * 20)
    cols = 4 * (4 * h + 2 * h + i)  # every matrix's columns, whole on each rank
    rows = 4 * (4 * h + 2 * i + h) // n  # row factors, sharded (these divide evenly)
    assert r["adalomo_state"] == layers * (cols + rows + 2 * 4 * h // n) + 2 * 4 * (v // n + h) \
        + 4 * h // n
    parts = ("shards", "gathered", "largest_gradient_x2", "activations", "adalomo_state")
    assert r["total"] == sum(r[k] for k in parts)
    assert r["fsdp_adamw"] == 16 * r["parameters"] / n + r["gathered"] + r["activations"]
