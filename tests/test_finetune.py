"""End-to-end fine-tuning (lomo_kernels.finetune) on tiny CPU configs."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lomo_kernels import AdaLomo  # noqa: E402
from lomo_kernels import finetune as ft  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster and steadier than OpenMP threads on a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
FAST = ["--quiet", "--seq-len", "64", "--batch-size", "8", "--eval-batches", "1"]


def _tiny(layers=2, **kw):
    return ft.build_config("tiny", num_hidden_layers=layers, **kw)


# ------------------------------------------------------------------------------- the demo


def test_demo_reduces_loss():
    s = ft.main(FAST + ["--steps", "40"])
    assert s["optimizer"] == "adalomo" and s["steps"] == 40 and s["finite"]
    assert s["backend"] in ("native", "torch")
    assert s["last_loss_avg"] < s["first_loss"] - 0.5, s["losses"]
    assert s["eval_loss_end"] < s["eval_loss_start"] - 0.5
    # the initial loss of a fresh model is about ln(vocab)
    assert abs(s["first_loss"] - math.log(ft.ByteTokenizer.vocab_size)) < 0.3
    assert s["tokens_per_s"] > 0 and s["peak_memory_bytes"] > 0
    assert s["peak_memory_kind"] == "cpu_max_rss"
    assert len(s["losses"]) == len(s["lrs"]) == 40


@pytest.mark.parametrize("optimizer", ["adamw", "lomo", "adalomo", "golore", "galore"])
def test_each_optimizer_trains(optimizer):
    s = ft.main(FAST + ["--steps", "12", "--optimizer", optimizer])
    assert s["optimizer"] == optimizer and s["finite"]
    assert s["lr"] == ft.DEFAULT_LR[optimizer]
    assert (s["backend"] is None) == (optimizer == "adamw")
    assert s["last_loss_avg"] < s["first_loss"] - 0.2, s["losses"]


def test_golore_state_bytes_are_the_documented_layout():
    # The README's Llama-3-8B state bytes come from bench_golore.state_bytes; here the same
    # function against a real run's state on the demo model (embeddings and head full rank).
    sys.path.insert(0, str(REPO))
    from bench.bench_golore import state_bytes

    s = ft.main(FAST + ["--steps", "2", "--optimizer", "golore", "--rank", "8"])
    model = ft.build_model(ft.build_config("tiny"))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert s["optimizer_state_bytes"] == state_bytes("golore", shapes, 8, ft.GOLORE_EXCLUDE)
    assert state_bytes("golore", shapes, 8) < s["optimizer_state_bytes"]
    with pytest.raises(ValueError, match="clip-grad-value is not supported"):
        ft.main(FAST + ["--steps", "1", "--optimizer", "galore", "--clip-grad-value", "1"])


def test_clip_grad_norm_and_schedule():
    s = ft.main(FAST + ["--steps", "6", "--clip-grad-norm", "1.0", "--schedule", "cosine",
                        "--warmup-steps", "2", "--lr", "0.02", "--backend", "torch"])
    assert s["finite"] and s["backend"] == "torch"
    lrs = s["lrs"]
    assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.02)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] >= 0.002


def test_one_backward_clipping_and_the_logged_norm():
    s = ft.main(FAST + ["--steps", "4", "--clip-grad-norm", "0.5", "--clip-mode", "previous"])
    assert s["finite"] and s["clip_mode"] == "previous"
    assert len(s["grad_norms"]) == 4 and all(0 < n < 1e3 for n in s["grad_norms"])


def test_bf16_lomo_stochastic_rounding_runs():
    s = ft.main(FAST + ["--steps", "4", "--dtype", "bf16", "--optimizer", "lomo",
                        "--rounding", "stochastic"])
    assert s["finite"] and s["dtype"] == "bf16"


def test_explicit_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton then cannot run CPU tensors
    with pytest.raises(ft.UsageError, match="backend .triton. cannot run on cpu"):
        ft.main(FAST + ["--steps", "1", "--backend", "triton", "--device", "cpu"])


def test_cli_prints_progress_and_summary():
    r = subprocess.run(
        [sys.executable, "-m", "lomo_kernels.finetune", "--steps", "3", "--seq-len", "32",
         "--batch-size", "2", "--eval-batches", "1"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3/3" in r.stderr  # the tqdm bar
    for key in ("summary", "train loss", "eval loss", "tokens/s", "peak memory", "adalomo",
                "backend"):
        assert key in r.stdout, r.stdout


# ------------------------------------------------------------------------------- data


def test_corpus_and_tokenizer():
    docs = ft.stdlib_corpus()
    assert docs[0].startswith("The Zen of Python")
    assert sum(map(len, docs)) > 100_000
    tok = ft.ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "héllo"
    train, held = ft.make_token_stream(docs, tok)
    assert train.max() < tok.vocab_size and held.numel() > 1000
    b = ft.sample_batch(train, 3, 17, torch.Generator().manual_seed(0))
    assert b.shape == (3, 17) and b.dtype == torch.long


# ------------------------------------------------------------------------------- large-shape paths


def test_meta_init_materialises_in_target_dtype():
    cfg = _tiny()
    model = ft.build_model(cfg, dtype=torch.bfloat16, device="cpu", meta_init=True, seed=3)
    for name, p in model.named_parameters():
        assert not p.is_meta and p.device.type == "cpu", name
        assert p.dtype == torch.bfloat16, name
        assert torch.isfinite(p.float()).all(), name
    w = model.model.layers[0].mlp.up_proj.weight.float()
    assert 0.015 < w.std().item() < 0.025  # normal(0, initializer_range=0.02)
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    # RoPE inverse frequencies: recomputed in fp32, equal to an ordinarily built model's
    rotary = model.model.rotary_emb
    ref = ft.build_model(cfg, dtype=torch.bfloat16, meta_init=False).model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rotary.inv_freq, ref.inv_freq, rtol=0, atol=0)
    theta = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    d = cfg.hidden_size // cfg.num_attention_heads
    torch.testing.assert_close(rotary.inv_freq, 1.0 / theta ** (torch.arange(0, d, 2).float() / d))
    # same seed, same weights
    again = ft.build_model(cfg, dtype=torch.bfloat16, device="cpu", meta_init=True, seed=3)
    for (n, a), b in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(a, b), n
    x = torch.randint(0, 256, (2, 16))
    loss = model(input_ids=x, labels=x).loss
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.3


def test_meta_init_reties_tied_embeddings():
    model = ft.build_model(_tiny(tie_word_embeddings=True), meta_init=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = AdaLomo(model, lr=1e-2)  # the tied weight gets one hook, one update of its full gradient
    x = torch.randint(0, 256, (2, 16))
    before = model.lm_head.weight.detach().clone()
    opt.fused_backward(model(input_ids=x, labels=x).loss, 1e-2)
    assert not torch.equal(before, model.lm_head.weight)


def test_gradient_checkpointing_gives_the_same_updates():
    """Non-reentrant checkpointing recomputes the forward inside the backward; every hook must
    still fire once per parameter with the full gradient, so the trajectory is unchanged."""
    cfg = _tiny(layers=3)
    a = ft.build_model(cfg, seed=1)
    b = ft.build_model(cfg, seed=1, gradient_checkpointing=True)
    assert b.model.gradient_checkpointing and not a.model.gradient_checkpointing
    oa, ob = AdaLomo(a, lr=1e-2, backend="torch"), AdaLomo(b, lr=1e-2, backend="torch")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randint(0, 256, (2, 24), generator=g)
        la, lb = a(input_ids=x, labels=x).loss, b(input_ids=x, labels=x).loss
        torch.testing.assert_close(la, lb)
        oa.fused_backward(la, 1e-2)
        ob.fused_backward(lb, 1e-2)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_sdpa_attention_matches_eager():
    sdpa = ft.build_model(_tiny(attn_implementation="sdpa"), seed=2)
    eager = ft.build_model(_tiny(attn_implementation="eager"), seed=2)
    assert sdpa.config._attn_implementation == "sdpa"
    assert eager.config._attn_implementation == "eager"
    x = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(sdpa(input_ids=x).logits, eager(input_ids=x).logits,
                               rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_flag_end_to_end():
    s = ft.main(FAST + ["--steps", "3", "--gradient-checkpointing", "--dtype", "bf16"])
    assert s["gradient_checkpointing"] and s["finite"]


@pytest.mark.parametrize("name", ["1b", "llama2-7b", "llama3-8b"])
def test_large_configs_on_the_meta_device(name):
    """The large shapes: parameter counts of the public models (built on meta: no memory)."""
    expected = {"1b": 1.236e9, "llama2-7b": 6.738e9, "llama3-8b": 8.030e9}[name]
    cfg = ft.build_config(name)
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(expected, rel=2e-3)
    assert ft.llama_num_params(ft.MODEL_CONFIGS[name]) == n
    assert cfg._attn_implementation == "sdpa" and cfg.use_cache is False


def test_unknown_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model config"):
        ft.build_config("gpt5")
