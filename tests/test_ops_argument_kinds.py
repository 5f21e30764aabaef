"""Every public entry point of lomo_kernels.ops checks the kinds of its shapes, dtypes, tensors,
integers and numbers, and says what it expected (TypeError for a wrong kind, ValueError for a
value out of range), before any tensor changes. (The per-backend fuzzing of the update ops'
invalid inputs: tests/test_fuzz_backends.py.)"""

import math

import pytest
import torch

from lomo_kernels import ops


@pytest.mark.parametrize("shapes, error, words", [
    (torch.zeros(3, 4), TypeError, "shapes must be a list of shapes"),  # was "negative size"
    (torch.Size([3, 4]), TypeError, "shapes[0] must be a torch.Size"),  # one shape, not a list
    ((3, 4), TypeError, "shapes[0] must be a torch.Size"),
    (5, TypeError, "shapes must be a list of shapes"),
    ("3x4", TypeError, "shapes must be a list of shapes"),
    ([torch.zeros(3)], TypeError, "shapes[0] must be a torch.Size or a sequence of integers"),
    ([(3, 4), (2, "a")], TypeError, "shapes[1] must be a torch.Size"),
    ([(3, 4.0)], TypeError, "shapes[0] must be a torch.Size"),
    ([(3, True)], TypeError, "shapes[0] must be a torch.Size"),
    ([(3, -4)], ValueError, "shapes[0] has a negative size"),
])
def test_workspace_numel_checks_its_shapes(shapes, error, words):
    with pytest.raises(error) as exc:
        ops.workspace_numel("adalomo_update_", shapes)
    assert words in str(exc.value) and "workspace_numel" in str(exc.value)


def test_workspace_numel_accepts_every_kind_of_shape():
    want = ops.workspace_numel("adalomo_update_", [(37, 129)])
    assert want > 0
    for shapes in ([torch.Size([37, 129])], [[37, 129]], ((37, 129),), [torch.zeros(37, 129).shape]):
        assert ops.workspace_numel("adalomo_update_", shapes) == want


@pytest.mark.parametrize("op", [3, None, "adalomo"])
def test_workspace_numel_checks_the_op(op):
    with pytest.raises(ValueError, match="op must be one of"):
        ops.workspace_numel(op, [(3, 4)])


def test_workspace_numel_checks_the_device():
    with pytest.raises(TypeError, match="device must be a torch.device or a string"):
        ops.workspace_numel("lomo_update_", [(3,)], device=0.5)


@pytest.mark.parametrize("shape, error", [
    (torch.zeros(3, 4), TypeError), ("34", TypeError), (7, TypeError), ((3, -1), ValueError),
    ((3.0, 4), TypeError),
])
def test_adalomo_state_shapes_checks_its_shape(shape, error):
    with pytest.raises(error, match="adalomo_state_shapes: shape"):
        ops.adalomo_state_shapes(shape)


def test_adalomo_state_shapes_accepts_sizes_and_sequences():
    want = {"exp_avg_sq_row": (3,), "exp_avg_sq_col": (4,)}
    assert ops.adalomo_state_shapes(torch.Size([3, 4])) == want
    assert ops.adalomo_state_shapes([3, 4]) == want


@pytest.mark.parametrize("inner, momentum, error, words", [
    ("adam", 0.0, ValueError, "inner must be one of"),
    (None, 0.0, ValueError, "inner must be one of"),
    ("sgd", "0.9", TypeError, "momentum must be a finite number"),
    ("sgd", None, TypeError, "momentum must be a finite number"),
])
def test_golore_state_names_checks_its_arguments(inner, momentum, error, words):
    with pytest.raises(error, match=words):
        ops.golore_state_names(inner, momentum)


def _lomo(**kw):
    p, g = torch.ones(5), torch.full((5,), 0.5)
    before = p.clone()
    with pytest.raises((TypeError, ValueError)) as exc:
        ops.lomo_update_(p, g, **{"lr": 0.1, **kw})
    assert torch.equal(p, before), "nothing changes"
    return exc


@pytest.mark.parametrize("kw, error, words", [
    (dict(seed="1"), TypeError, "seed must be an integer"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(seed=2**70), ValueError, "seed must fit in 64 bits"),
    (dict(step=2.0), TypeError, "step must be an integer"),
    (dict(step=-1), ValueError, "step must be an integer >= 0"),
    (dict(step=True), TypeError, "step must be an integer"),
    (dict(rounding=1), ValueError, "rounding must be one of"),
    (dict(clip_coef=0.5), TypeError, "clip_coef must be a tensor or None"),
    (dict(found_inf=[0.0]), TypeError, "found_inf must be a tensor or None"),
    (dict(grad_sq=torch.zeros(2)), ValueError, "grad_sq must be a 1-element float32 tensor"),
    (dict(workspace=[0.0] * 64), TypeError, "workspace must be a tensor or None"),
    (dict(workspace=torch.zeros(4, 16)), ValueError, "workspace must be a contiguous 1-d"),
])
def test_lomo_update_checks_argument_kinds(kw, error, words):
    exc = _lomo(**kw)
    assert exc.type is error and words in str(exc.value) and "lomo_update_" in str(exc.value)


@pytest.mark.parametrize("kw, error, words", [
    (dict(seed="3"), TypeError, "seed must be an integer"),
    (dict(stage=1.0), TypeError, "stage must be an integer"),
    (dict(global_rows="4"), TypeError, "global_rows must be an integer"),
    (dict(global_numel=2.5), TypeError, "global_numel must be an integer"),
    (dict(exp_avg_sq_row=[0.0] * 3), TypeError, "exp_avg_sq_row must be a tensor"),
])
def test_adalomo_update_checks_argument_kinds(kw, error, words):
    p, g = torch.ones(3, 4), torch.full((3, 4), 0.5)
    state = {"exp_avg_sq_row": torch.ones(3), "exp_avg_sq_col": torch.ones(4)}
    state.update({k: v for k, v in kw.items() if k in state})
    rest = {k: v for k, v in kw.items() if k not in state}
    before = p.clone()
    with pytest.raises(error) as exc:
        ops.adalomo_update_(p, g, **state, lr=0.1, beta=0.5, **rest)
    assert words in str(exc.value) and torch.equal(p, before)


@pytest.mark.parametrize("case, error, words", [
    ("params a tensor", TypeError, "params must be a list of tensors"),
    ("grads a tensor", TypeError, "grads must be a list of tensors"),
    ("lr a string", TypeError, "lr must be a finite number"),
    ("lr in a list of strings", TypeError, "lr must be a finite number"),
    ("seed a float", TypeError, "seed must be an integer"),
    ("step strings", TypeError, "step must be an integer"),
    ("a param not a tensor", TypeError, "param must be a tensor"),
])
def test_lomo_update_multi_checks_argument_kinds(case, error, words):
    ps = [torch.ones(3), torch.ones(5)]
    gs = [torch.full((3,), 0.5), torch.full((5,), 0.5)]
    before = [p.clone() for p in ps]
    args, kw = [ps, gs], dict(lr=0.1)
    if case == "params a tensor":
        args[0] = ps[0]
    elif case == "grads a tensor":
        args[1] = gs[0]
    elif case == "lr a string":
        kw["lr"] = "0.1"
    elif case == "lr in a list of strings":
        kw["lr"] = ["0.1", "0.1"]
    elif case == "seed a float":
        kw["seed"] = 1.5
    elif case == "step strings":
        kw["step"] = ["1", "2"]
    elif case == "a param not a tensor":
        args[0] = [ps[0], [1.0] * 5]
    with pytest.raises(error) as exc:
        ops.lomo_update_multi_(*args, **kw)
    assert words in str(exc.value) and "lomo_update_multi_" in str(exc.value)
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


def test_adalomo_update_multi_checks_its_state_list():
    ps, gs = [torch.ones(3)], [torch.full((3,), 0.5)]
    with pytest.raises(TypeError, match="exp_avg_sqs must be a list of tensors"):
        ops.adalomo_update_multi_(ps, gs, torch.ones(3), lr=0.1, beta=0.5)
    with pytest.raises(TypeError, match="beta must be a finite number"):
        ops.adalomo_update_multi_(ps, gs, [torch.ones(3)], lr=0.1, beta=["0.5"])
    assert torch.equal(ps[0], torch.ones(3))


@pytest.mark.parametrize("kw, error, words", [
    (dict(lr="0.1"), TypeError, "lr must be a finite number"),
    (dict(lr=math.nan), ValueError, "lr must be a finite number"),
    (dict(beta1=1.0), ValueError, "beta1 must be in [0, 1)"),
    (dict(beta2="0.99"), TypeError, "beta2"),
    (dict(eps=-1.0), ValueError, "eps must be a finite number >= 0"),
    (dict(scale=None), TypeError, "scale must be a finite number"),
    (dict(weight_decay=[0.1]), TypeError, "weight_decay must be a finite number"),
    (dict(seed=0.5), TypeError, "seed must be an integer"),
    (dict(step=1.0), TypeError, "step must be an integer"),
    (dict(exp_avg=[0.0] * 4), TypeError, "exp_avg must be a tensor"),
    (dict(param=[1.0] * 4), TypeError, "param must be a tensor or None"),
    (dict(clip_coef=0.5), TypeError, "clip_coef must be a tensor or None"),
    (dict(rounding=None), ValueError, "rounding must be one of"),
])
def test_golore_update_checks_argument_kinds(kw, error, words):
    r = torch.full((4,), 0.5)
    kw = {"exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4), "lr": 0.1, **kw}
    before = r.clone()
    with pytest.raises(error) as exc:
        ops.golore_update_(r, **kw)
    assert words in str(exc.value) and "golore_update_" in str(exc.value)
    assert torch.equal(r, before)
