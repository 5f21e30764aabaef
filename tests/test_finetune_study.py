"""bench/finetune_study.py's pieces: the held-out loss and greedy exact match from one forward
pass, bf16 parameters with float32 arithmetic, the choice of the learning rate."""

import argparse

import pytest
import torch

pytest.importorskip("transformers")

from bench import finetune_study as fs  # noqa: E402

EOS = 2


class _Fixed(torch.nn.Module):
    """A 'model' whose logits are given: argmax = ``pred`` at every position."""

    def __init__(self, pred: torch.Tensor, vocab: int = 7):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(pred, vocab).float() * 5.0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        return argparse.Namespace(logits=self.logits)


def test_heldout_exact_match_counts_label_tokens_up_to_the_first_eos():
    # labels (shifted by one inside heldout): row 0 answer [4, 5] + EOS + a trailing token
    labels = torch.tensor([[-100, -100, 4, 5, EOS, 6],
                           [-100, -100, 4, 5, EOS, 6],
                           [-100, -100, 4, 5, EOS, 6],
                           [-100, -100, 4, 5, EOS, -100]])
    pred = torch.tensor([[0, 4, 5, EOS, 1, 0],   # right up to EOS, wrong after: a match
                         [0, 4, 3, EOS, 6, 0],   # a wrong answer token
                         [0, 4, 5, 6, 6, 0],     # no EOS where expected (it would not stop)
                         [3, 4, 5, EOS, 0, 0]])  # wrong on a prompt position: not scored
    batch = {"input_ids": torch.zeros_like(labels), "labels": labels}
    out = fs.heldout(_Fixed(pred), [batch], EOS)
    assert out["exact_match"] == 0.5 and out["exact_match_n"] == 4
    logits = _Fixed(pred).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:],
                                            ignore_index=-100)
    assert out["eval_loss"] == pytest.approx(float(ref), rel=1e-6)


def test_float32_compute_keeps_bf16_parameters_and_gradients():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).float()
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    fs.float32_compute(model)
    ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.float32
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    # the same float32 arithmetic on the same (bf16-valued) weights
    assert float(out.loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16, n
        # bf16-rounded float32 gradients (a tied matrix's two parts are each rounded, then
        # summed in bf16): within a few bf16 ulps of the float32 gradient as a whole
        err = (p.grad.float() - q.grad).norm() / q.grad.norm()
        assert err < 1e-2, (n, float(err))


def _runs(losses: dict, family="adalomo"):
    return [{"spec": {"stage": "sweep", "optimizer": family, "lr": lr}, "eval_loss": v,
             "exact_match": 0.5} for lr, v in losses.items()]


def test_best_lr_waits_for_the_whole_sweep_and_never_picks_a_diverged_run():
    lrs = fs.SWEEP["adalomo"]
    assert fs.best_lr(_runs({lrs[0]: 0.3}), "adalomo") is None
    runs = _runs({lrs[0]: 0.3, lrs[1]: 0.1, lrs[2]: float("nan")})
    assert fs.best_lr(runs, "adalomo") == lrs[1]
    assert fs.best_lr(runs, "lomo_optim-adalomo") == lrs[1]  # the same update rule


def test_the_plan_reuses_seed_0_and_queues_rounding_after_the_sweep():
    args = argparse.Namespace(steps=8, batch_size=4, seq_len=80, eval_examples=40,
                              warmup_steps=2, optimizers=list(fs.LABELS))
    first = fs.plan(args, [])
    assert {s["stage"] for s in first} == {"baseline", "sweep"}
    # each family's best rate in the middle of its sweep (no extension)
    runs = [r for fam in fs.SWEEP
            for r in _runs({lr: abs(i - 1) for i, lr in enumerate(fs.SWEEP[fam])}, fam)]
    full = fs.plan(args, runs)
    seeds = [(s["optimizer"], s["seed"]) for s in full if s["stage"] == "seeds"]
    assert ("adalomo", 0) not in seeds and ("adalomo", 1) in seeds
    assert ("lomo_optim-adalomo", 0) in seeds and ("galore", 2) in seeds
    rounding = [s for s in full if s["stage"] == "rounding"]
    assert len(rounding) == 12 and all(s["dtype"] == "bf16" for s in rounding)
    assert {s["rounding"] for s in rounding} == {"nearest", "stochastic"}
    assert len({fs._key(s) for s in full}) == len(full)


def test_a_best_rate_at_an_end_of_the_sweep_extends_it_until_bracketed():
    lrs = fs.SWEEP["lomo"]
    runs = _runs({lrs[0]: 0.2, lrs[1]: 0.5, lrs[2]: 9.0}, "lomo")
    ext = fs.sweep_lrs(runs, "lomo")
    assert len(ext) == 4 and ext[0] == pytest.approx(lrs[0] ** 2 / lrs[1], rel=0.2)
    assert fs.best_lr(runs, "lomo") is None  # the extension is not measured yet
    runs += _runs({ext[0]: 0.3}, "lomo")
    assert fs.best_lr(runs, "lomo") == lrs[0]
    assert fs.sweep_lrs(runs, "lomo") == ext  # bracketed: no further extension
    runs[-1]["eval_loss"] = 0.1  # the new end is the best: one more step, then no more
    ext2 = fs.sweep_lrs(runs, "lomo")
    assert len(ext2) == 5 and ext2[1:] == ext
    runs += _runs({ext2[0]: 0.05}, "lomo")
    assert fs.sweep_lrs(runs, "lomo") == ext2 and fs.best_lr(runs, "lomo") == ext2[0]
