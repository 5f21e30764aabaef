"""fp16 parameters: the dynamic loss scaler engages whatever the loss dtype (Hugging Face models
return an fp32 loss), with a sane initial scale; and compiled autograd is refused clearly."""

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lomo_kernels import AdaLomo, Lomo, LossScaleOverflowWarning


def tiny_llama_fp16():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).half()


def _train(model, opt, steps):
    """grad_norm + fused_backward steps; returns the number of steps skipped for overflow."""
    g = torch.Generator().manual_seed(1)
    skipped = 0
    for _ in range(steps):
        x = torch.randint(0, 97, (2, 12), generator=g)
        loss = model(x, labels=x).loss
        assert loss.dtype == torch.float32  # what HF models return, even in fp16
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.grad_norm(loss)
            opt.fused_backward(loss, 0.05)
        skipped += sum(issubclass(x.category, LossScaleOverflowWarning) for x in w)
    return skipped


def test_fp16_hf_model_engages_the_scaler_with_a_sane_initial_scale():
    model = tiny_llama_fp16()
    with pytest.warns(UserWarning, match=r"float16 parameters: dynamic loss scaling is on .*"
                                         r"initial scale 65536.*clip_grad_norm was None and is "
                                         r"now 1.0"):
        opt = Lomo(model, lr=0.05)
    assert opt.loss_scaler is not None and opt.loss_scaler.loss_scale == 2.0**16
    before = [p.detach().clone() for p in model.parameters()]
    skipped = _train(model, opt, 12)
    assert skipped <= 1, skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    moved = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert moved >= len(before) - 4  # (tiny updates of the RMSNorm weights, 1.0, round away)
    # lomo-optim's initial scale (2**32) overflows fp16 gradients for many steps
    model = tiny_llama_fp16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = Lomo(model, lr=0.05, loss_scale_args={"init_scale": 2.0**32})
    assert _train(model, opt, 12) >= 10


def test_fp16_scaler_needs_the_grad_norm_pass_and_says_so():
    model = tiny_llama_fp16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = Lomo(model, lr=0.05)
    x = torch.randint(0, 97, (2, 12))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="float16 loss scaler.*call optimizer.grad_norm"):
        opt.fused_backward(model(x, labels=x).loss, 0.05)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_fp16_with_a_plain_backward_warns_once_and_trains(cls):
    model = tiny_llama_fp16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = cls(model, lr=1e-3)
    scale = opt.loss_scaler.loss_scale if opt.loss_scaler is not None else None
    x = torch.randint(0, 97, (2, 12))
    with pytest.warns(UserWarning, match="float16 parameters with a plain loss.backward"):
        model(x, labels=x).loss.backward()  # no clip_grad_norm error: the user set none
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model(x, labels=x).loss.backward()  # said once
    opt.step()
    if scale is not None:
        assert opt.loss_scaler.loss_scale == scale  # a plain backward is not scaled
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_loss_still_engages_the_scaler_as_in_lomo_optim():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 parameters: nothing to say at construction
        opt = Lomo(m, lr=0.1)
    assert opt.loss_scaler is None
    loss = m(torch.randn(3, 4)).pow(2).mean().half()
    with pytest.warns(UserWarning, match="float16 loss: dynamic loss scaling is on"):
        opt.grad_norm(loss)  # (the fp16 loss times 2**16 may overflow: the scale then halves)
    assert opt.loss_scaler.loss_scale <= 2.0**16 and opt.clip_grad_norm == 1.0


# ---------------------------------------------------------------- compiled autograd


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_compiled_autograd_is_refused_at_the_first_backward(cls):
    import torch._dynamo.compiled_autograd as ca

    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    opt = cls(m, lr=0.1)
    before = [p.detach().clone() for p in m.parameters()]
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="do not work under compiled autograd"):
        with ca._enable(lambda gm: gm):
            m(x).sum().backward()
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    with pytest.raises(RuntimeError, match="do not work under compiled autograd"):
        with ca._enable(lambda gm: gm):
            opt.fused_backward(m(x).sum(), 0.1)  # refused before the backward starts
    m(x).sum().backward()  # eager: fine
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_compiled_autograd_config_is_refused_at_construction(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "compiled_autograd", True)
    m = torch.nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match="AdaLomo: in-backward updates do not work under "
                                           "compiled autograd"):
        AdaLomo(m)
    assert not m.weight._post_accumulate_grad_hooks
