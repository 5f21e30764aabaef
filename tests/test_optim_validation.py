"""Strict argument checks: every constructor and call argument, with a message that names the
argument and says what it accepts; and the optimizers' repr."""

import copy
import warnings

import pytest
import torch

from lomo_kernels import AdaLomo, DynamicLossScaler, GoLore, Lomo, ops


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)


NAN, INF = float("nan"), float("inf")

COMMON = [  # (kwargs, exception, message) for both optimizers
    (dict(independent_ranks=1), TypeError, r"independent_ranks must be True or False, got 1"),
    (dict(lr=NAN), ValueError, r"lr must be a finite number >= 0, got nan"),
    (dict(lr=INF), ValueError, r"lr must be a finite number >= 0, got inf"),
    (dict(lr=-1e-3), ValueError, r"lr must be a finite number >= 0, got -0.001"),
    (dict(lr="1e-3"), TypeError, r"lr must be a finite number >= 0, got '1e-3' \(str\)"),
    (dict(lr=None), TypeError, r"lr must be a finite number >= 0, got None"),
    (dict(lr=True), TypeError, r"lr must be .* \(bool\)"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay must be a finite number >= 0"),
    (dict(weight_decay=NAN), ValueError, r"weight_decay must be a finite number >= 0"),
    (dict(clip_grad_norm=0.0), ValueError, r"clip_grad_norm must be None \(off\) or a finite number > 0"),
    (dict(clip_grad_norm=-1.0), ValueError, r"clip_grad_norm must be None \(off\) or a finite"),
    (dict(clip_grad_norm=INF), ValueError, r"clip_grad_norm must be None \(off\) or a finite"),
    (dict(clip_grad_norm="1"), TypeError, r"clip_grad_norm must be None"),
    (dict(clip_grad_value=-1.0), ValueError, r"clip_grad_value must be None \(off; 0 is off too\) or"),
    (dict(clip_grad_value=NAN), ValueError, r"clip_grad_value must be None"),
    (dict(backend="cuda"), ValueError, r"backend must be one of \("),
    (dict(backend=None), ValueError, r"backend must be one of"),
    (dict(rounding="up"), ValueError, r"rounding must be one of \('nearest', 'stochastic'\)"),
    (dict(rounding="stochastic"), ValueError, r"rounding='stochastic' applies to float16/bfloat16"),
    (dict(seed=1.5), TypeError, r"seed must be an integer, got 1.5"),
    (dict(seed="0"), TypeError, r"seed must be an integer"),
]

ADALOMO = [
    (dict(eps=1e-3), TypeError, r"eps must be a pair \(eps1, eps2\) of finite numbers >= 0"),
    (dict(eps=(1e-30,)), TypeError, r"eps must be a pair"),
    (dict(eps="ab"), TypeError, r"eps must be a pair"),
    (dict(eps=(1e-30, -1e-3)), ValueError, r"eps\[1\] must be a finite number >= 0"),
    (dict(eps=(NAN, 1e-3)), ValueError, r"eps\[0\] must be a finite number >= 0"),
    (dict(clip_threshold=0.0), ValueError, r"clip_threshold must be a finite number > 0"),
    (dict(clip_threshold=NAN), ValueError, r"clip_threshold must be a finite number > 0"),
    (dict(decay_rate=0.8), ValueError, r"decay_rate must be a finite number <= 0"),
    (dict(decay_rate=-INF), ValueError, r"decay_rate must be a finite number <= 0"),
    (dict(loss_scale=-1.0), ValueError, r"loss_scale must be None \(off; 0 is off too\) or a finite"),
    (dict(loss_scale=INF), ValueError, r"loss_scale must be None"),
    (dict(loss_scale="1024"), TypeError, r"loss_scale must be None"),
]

LOMO = [
    (dict(loss_scale_args=[1]), TypeError, r"loss_scale_args must be None or a dict"),
    (dict(loss_scale_args={"init": 2.0}), TypeError, r"unknown argument 'init'; accepted: init_scale"),
    (dict(loss_scale_args={"init_scale": 0}), ValueError, r"loss_scale_args\['init_scale'\] must be a finite number > 0"),
    (dict(loss_scale_args={"init_scale": NAN}), ValueError, r"loss_scale_args\['init_scale'\] must be a finite"),
    (dict(loss_scale_args={"scale_factor": 1.0}), ValueError, r"loss_scale_args\['scale_factor'\] must be a finite number > 1"),
    (dict(loss_scale_args={"scale_window": 0}), ValueError, r"loss_scale_args\['scale_window'\] must be an integer >= 1"),
    (dict(loss_scale_args={"min_scale": 4.0, "init_scale": 2.0}), ValueError, r"loss_scale_args\['min_scale'\] \(4.0\) must be <= "),
]


def _cases(cls):
    extra = ADALOMO if cls is AdaLomo else LOMO
    return [(cls, *case) for case in COMMON + extra]


@pytest.mark.parametrize("cls,kw,exc,msg", _cases(Lomo) + _cases(AdaLomo),
                         ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_bad_constructor_argument_is_named(cls, kw, exc, msg):
    m = mlp()
    with pytest.raises(exc, match=f"^{cls.__name__}: .*{msg}"):
        cls(m, **kw)
    assert all(not p._post_accumulate_grad_hooks for p in m.parameters())


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("model,exc,msg", [
    (None, TypeError, "got NoneType"),
    (3, TypeError, "got int"),
    ("weights", TypeError, "got str"),
    (torch.zeros(3, requires_grad=True), TypeError, r"got a single tensor \(pass \[tensor\]\)"),
    ([], ValueError, "got an empty iterable"),
    ([1.0, 2.0], TypeError, "one element is a float"),
])
def test_bad_model_is_named(cls, model, exc, msg):
    with pytest.raises(exc, match=f"{cls.__name__}: model must be an nn.Module, an iterable of "
                                  f"parameters or an iterable of param-group dicts.*{msg}"):
        cls(model)


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_frozen_model_is_refused(cls):
    m = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        cls(m)


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_bad_param_group_value_is_named(cls):
    m = mlp()
    groups = [{"params": list(m[0].parameters())},
              {"params": list(m[2].parameters()), "lr": NAN}]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\] must be a finite number"):
        cls(groups, lr=0.1)
    if cls is AdaLomo:
        groups[1] = {"params": list(m[2].parameters()), "eps": (1e-30, "x")}
        with pytest.raises(TypeError, match=r"param_groups\[1\]\['eps'\]\[1\] must be"):
            cls(groups, lr=0.1)
    assert all(not p._post_accumulate_grad_hooks for p in m.parameters())


def test_named_parameters_give_their_names_in_errors():
    m = mlp()
    named = list(m.named_parameters())
    opt = Lomo(named, lr=0.1)
    opt.param_groups[0]["lr"] = NAN
    with pytest.raises(ValueError, match=r"at parameter 2\.(weight|bias)"):
        m(torch.randn(2, 4)).sum().backward()


def test_stochastic_rounding_with_mixed_dtypes_is_accepted():
    m = mlp()
    m[2].to(torch.bfloat16)
    opt = Lomo([*m[0].parameters(), *m[2].parameters()], lr=0.1, rounding="stochastic")
    assert opt.rounding == "stochastic"


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_bad_values_in_a_loaded_state_dict_change_nothing(cls):
    m = mlp()
    opt = cls(m, lr=0.1)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = "fast"
    with pytest.raises(TypeError, match=r"state_dict param_groups\[0\]\['lr'\] must be"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("cls", [Lomo, AdaLomo, GoLore])
def test_public_methods_check_the_kinds_of_their_arguments(cls):
    m = mlp()
    opt = cls(m, lr=1e-2, **({"rank": 2} if cls is GoLore else {}))
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(TypeError, match=r"step\(closure\): closure must be None or a callable "
                                        r"that returns the loss, got float"):
        opt.step(0.5)
    with pytest.raises(TypeError, match="load_state_dict takes the dict that "
                                        r"optimizer.state_dict\(\) returns.*got list"):
        opt.load_state_dict([])
    with pytest.raises(TypeError, match=r"got a dict with keys \['param_groups'\]"):
        opt.load_state_dict({"param_groups": []})
    with pytest.raises(TypeError, match="loss must be a tensor, got float"):
        opt.fused_backward(1.0, 0.1)
    with pytest.raises(TypeError, match="fused_backward lr must be a finite number >= 0"):
        opt.fused_backward(m(torch.ones(1, 4)).sum(), "0.1")
    with pytest.raises(TypeError, match="a param group must be a dict"):
        opt.add_param_group([torch.nn.Parameter(torch.ones(3))])
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert opt.step(lambda: 3.0) == 3.0


def test_dynamic_loss_scaler_arguments():
    with pytest.raises(ValueError, match="DynamicLossScaler: init_scale must be a finite number > 0"):
        DynamicLossScaler(init_scale=INF)
    with pytest.raises(TypeError, match="DynamicLossScaler: scale_window must be an integer"):
        DynamicLossScaler(scale_window=2.5)
    assert DynamicLossScaler().loss_scale == 2.0**16


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(lr=NAN), ValueError, "lomo_update_: lr must be a finite number >= 0"),
    (dict(lr="0.1"), TypeError, "lomo_update_: lr must be a finite number >= 0"),
    (dict(weight_decay=-1.0), ValueError, "lomo_update_: weight_decay must be"),
    (dict(loss_scale=0.0), ValueError, "lomo_update_: loss_scale must be a finite number > 0"),
    (dict(clip_grad_value=INF), ValueError, "lomo_update_: clip_grad_value"),
])
def test_op_entry_point_scalars_are_checked(kw, exc, msg):
    p, g = torch.randn(3, 4), torch.randn(3, 4)
    before = p.clone()
    args = dict(lr=0.1, backend="torch")
    args.update(kw)
    with pytest.raises(exc, match=msg):
        ops.lomo_update_(p, g, **args)
    assert torch.equal(p, before)
    with pytest.raises(ValueError, match="adalomo_update_: beta must be a finite number >= 0 <= 1"):
        ops.adalomo_update_(p, g, exp_avg_sq_row=torch.zeros(3), exp_avg_sq_col=torch.zeros(4),
                            lr=0.1, beta=1.5, backend="torch")
    assert torch.equal(p, before)


def test_repr_shows_backend_rounding_and_hyper_parameters():
    m = mlp(torch.bfloat16)
    r = repr(AdaLomo(m, lr=2e-3, clip_grad_value=0.5, backend="torch", rounding="stochastic",
                     seed=3))
    for part in ("AdaLomo(", "backend='torch' (cpu: torch)", "rounding='stochastic'", "lr=0.002",
                 "eps=(1e-30, 0.001)", "clip_threshold=1.0", "decay_rate=-0.8",
                 "clip_grad_value=0.5", "loss_scale=1024", "clip_grad_norm=None", "seed=3",
                 "parameters=4"):
        assert part in r, (part, r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = Lomo([{"params": list(m[0].parameters()), "lr": 0.1},
                    {"params": list(m[2].parameters()), "lr": 0.2}], weight_decay=0.01)
    r = repr(opt)
    assert "Lomo(backend='auto' (cpu: " in r and "lr=[0.1, 0.2]" in r and "weight_decay=0.01" in r
    assert "param_groups=2" in r
