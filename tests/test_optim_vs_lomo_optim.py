"""Lomo / AdaLomo against lomo-optim 0.1.1 itself, step by step, on a small transformers Llama.

lomo-optim calls `.cuda()` on its state; on CPU we patch `Tensor.cuda` to the identity while it
is constructed. Each test runs both optimizers on deep copies of one random model with the same
data, and compares every loss and, after the first step, every parameter.
"""

import copy
from unittest import mock

import lomo_optim
import pytest
import torch
from conftest import ulp_distance
from transformers import LlamaConfig, LlamaForCausalLM

import lomo_kernels
from lomo_kernels import ops

CPU_BACKENDS = ["torch"] + (["native"] if ops.available_backends()["native"].startswith("loaded") else [])


def tiny_llama(dtype, tied=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def lomo_optim_instance(cls, model, **kw):
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self):
        return cls(model, **kw)


def assert_params_close(m_ours, m_ref, dtype, ulps=1, rtol=1e-5):
    for (name, a), b in zip(m_ours.named_parameters(), m_ref.parameters()):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6, msg=name)
        else:
            d = ulp_distance(a.detach(), b.detach()).max().item()
            assert d <= ulps, f"{name}: {d} ulps"


def run_pair(ours_cls, ref_cls, dtype, steps, lr, kw, backend, clip_norm):
    model = tiny_llama(dtype)
    m_ref, m_ours = copy.deepcopy(model), copy.deepcopy(model)
    ref = lomo_optim_instance(ref_cls, m_ref, lr=lr, **kw)
    ours = ours_cls(m_ours, lr=lr, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        x = torch.randint(0, 97, (2, 12), generator=g)
        pair = []
        for m, opt in ((m_ref, ref), (m_ours, ours)):
            loss = m(x, labels=x).loss
            if clip_norm:
                opt.grad_norm(loss)
            opt.fused_backward(loss, lr)
            pair.append(loss.item())
        losses.append(pair)
        if step == 0:
            assert_params_close(m_ours, m_ref, dtype)
    return losses


CONFIGS = {
    "plain": dict(),
    "wd_clip_value": dict(weight_decay=0.05, clip_grad_value=0.02),
    "clip_norm": dict(clip_grad_norm=0.5, weight_decay=0.01),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adalomo_matches_lomo_optim(dtype, config, backend):
    kw = CONFIGS[config]
    losses = run_pair(lomo_kernels.AdaLomo, lomo_optim.AdaLomo, dtype, 20, 5e-3, kw, backend,
                      "clip_grad_norm" in kw)
    for ref, ours in losses:
        assert abs(ours - ref) <= 1e-3 * abs(ref), losses
    assert losses[-1][1] < losses[0][1]  # and it trains


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lomo_matches_lomo_optim(dtype, config, backend):
    kw = CONFIGS[config]
    losses = run_pair(lomo_kernels.Lomo, lomo_optim.Lomo, dtype, 20, 0.05, kw, backend,
                      "clip_grad_norm" in kw)
    for ref, ours in losses:
        assert abs(ours - ref) <= 1e-3 * abs(ref), losses
    assert losses[-1][1] < losses[0][1]


def test_adalomo_defaults_and_signature_match_lomo_optim():
    import inspect

    for ours, ref in ((lomo_kernels.AdaLomo, lomo_optim.AdaLomo), (lomo_kernels.Lomo, lomo_optim.Lomo)):
        p_ours = inspect.signature(ours.__init__).parameters
        p_ref = inspect.signature(ref.__init__).parameters
        for name, prm in p_ref.items():
            assert name in p_ours, name
            if name == "loss_scale_args":  # {} in lomo-optim (a shared mutable default), None here
                assert p_ours[name].default is None
            else:
                assert p_ours[name].default == prm.default, name
        assert list(p_ours)[: len(p_ref)] == list(p_ref)  # same positional order
        for extra in ("backend", "rounding", "seed"):
            assert p_ours[extra].kind is inspect.Parameter.KEYWORD_ONLY


def test_tied_weights_updated_once_with_the_full_gradient():
    """Tied embedding / lm_head: one update with the summed gradient (AdaLomo is nonlinear in g,
    so two partial updates would differ). lomo-optim's scan also gets this case right: its
    tensor hook fires once per accumulation, and a single graph accumulates once."""
    model = tiny_llama(torch.float32, tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = torch.randint(0, 97, (2, 12))
    m_full = copy.deepcopy(model)
    m_full(x, labels=x).loss.backward()
    w = m_full.model.embed_tokens.weight
    want = w.detach().clone()
    row, col = torch.zeros(w.shape[0]), torch.zeros(w.shape[1])
    lomo_kernels.reference.adalomo_update_(want, w.grad, row, col, None, None, None, 1e-2, 0.0,
                                           1.0, 0.0, 0.0, 1e-30, 1e-3, 1.0, "nearest", 0, 1)
    m_ours = copy.deepcopy(model)
    opt = lomo_kernels.AdaLomo(m_ours, lr=1e-2, loss_scale=None)
    opt.fused_backward(m_ours(x, labels=x).loss, 1e-2)
    torch.testing.assert_close(m_ours.model.embed_tokens.weight, want, rtol=1e-5, atol=1e-7)
    assert opt.state[m_ours.model.embed_tokens.weight]["step"] == 1
    m_ref = copy.deepcopy(model)
    lomo_optim_instance(lomo_optim.AdaLomo, m_ref, lr=1e-2, loss_scale=None).fused_backward(
        m_ref(x, labels=x).loss, 1e-2)
    torch.testing.assert_close(m_ref.model.embed_tokens.weight, want, rtol=1e-5, atol=1e-7)


class _SharedNet(torch.nn.Module):
    """One Linear applied in two checkpoint segments: reentrant checkpointing delivers its
    gradient in two pieces (one per segment's inner backward)."""

    def __init__(self, reentrant):
        super().__init__()
        self.shared = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 1)
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        def block(t):
            return torch.tanh(self.shared(t))

        h = checkpoint(block, x, use_reentrant=self.reentrant)
        h = checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h).pow(2).mean()


def test_shared_weight_with_gradient_in_pieces():
    """Where a gradient does arrive in pieces, lomo-optim silently updates with each partial
    gradient (weight decay applied twice here); lomo_kernels refuses with a clear error, and with
    non-reentrant checkpointing applies the full gradient once."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    for reentrant in (True, False):
        model = _SharedNet(reentrant)
        m_full = copy.deepcopy(model)
        m_full(x).backward()
        want = m_full.shared.weight.detach().clone()
        lomo_kernels.reference.lomo_update_(want, m_full.shared.weight.grad, None, None, 0.1, 0.5,
                                            1.0, 0.0, "nearest", 0, 1)
        m_ref = copy.deepcopy(model)
        lomo_optim.Lomo(m_ref, lr=0.1, weight_decay=0.5).fused_backward(m_ref(x), 0.1)
        m_ours = copy.deepcopy(model)
        opt = lomo_kernels.Lomo(m_ours, lr=0.1, weight_decay=0.5)
        if reentrant:
            assert (m_ref.shared.weight - want).abs().max() > 1e-3  # partial-gradient updates
            with pytest.raises(RuntimeError, match="second gradient before optimizer.step"):
                opt.fused_backward(m_ours(x), 0.1)
        else:
            torch.testing.assert_close(m_ref.shared.weight, want)
            opt.fused_backward(m_ours(x), 0.1)
            torch.testing.assert_close(m_ours.shared.weight, want)


def test_lomo_optim_crashes_on_3d_parameters_and_we_factor_them():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 5, 7))

        def forward(self, x):
            return torch.einsum("bi,kij->bkj", x, self.w).pow(2).mean()

    net = Net()
    x = torch.randn(4, 5)
    ref = lomo_optim_instance(lomo_optim.AdaLomo, copy.deepcopy(net), lr=1e-2)
    with pytest.raises(Exception):
        m = ref.model
        ref.fused_backward(m(x), 1e-2)
    ours_net = copy.deepcopy(net)
    opt = lomo_kernels.AdaLomo(ours_net, lr=1e-2)
    opt.fused_backward(ours_net(x), 1e-2)
    st = opt.state[ours_net.w]
    assert st["exp_avg_sq_row"].shape == (3, 5) and st["exp_avg_sq_col"].shape == (3, 7)
    # the same as factoring each 5x7 slice with its own factors, with rms(u) and rms(p) over all
    net2 = copy.deepcopy(net)
    net2(x).backward()
    want = net2.w.detach().clone()
    lomo_kernels.reference.adalomo_update_(
        want, net2.w.grad * 1024.0 / 1024.0, torch.zeros(3, 5), torch.zeros(3, 7), None, None,
        None, 1e-2, 0.0, 1.0, 0.0, 0.0, 1e-30, 1e-3, 1.0, "nearest", 0, 1)
    torch.testing.assert_close(ours_net.w, want, rtol=1e-5, atol=1e-7)
