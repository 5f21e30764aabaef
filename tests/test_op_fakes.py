"""The ops' fake (meta) implementations check shapes, dtypes and devices (lomo_kernels/_ops.py), so a
wrong call through ``torch.ops.lomo_kernels.<op>`` itself (no Python entry point) is refused on
meta tensors, by ``torch.library.opcheck`` and while ``torch.compile`` traces, with the message
the kernels give (csrc/checks.h); a right call on meta tensors passes and changes nothing."""

import pytest
import torch

from lomo_kernels import ops

M = "meta"
LOMO = torch.ops.lomo_kernels.lomo_update_
ADALOMO = torch.ops.lomo_kernels.adalomo_update_
LOMO_MULTI = torch.ops.lomo_kernels.lomo_update_multi_
ADALOMO_MULTI = torch.ops.lomo_kernels.adalomo_update_multi_
GOLORE = torch.ops.lomo_kernels.golore_update_


def z(*shape, dtype=torch.float32, device=M):
    return torch.zeros(shape, dtype=dtype, device=device)


def _lomo(p=None, g=None, coef=None, found=None, rounding="nearest", grad_sq=None, ws=None):
    p = z(4, 6) if p is None else p
    g = z(4, 6) if g is None else g
    return (p, g, coef, found, 1e-2, 0.0, 1.0, 0.0, rounding, 0, 1, grad_sq, ws)


LOMO_BAD = {
    "grad shape": _lomo(g=z(3, 6)),
    "grad dtype": _lomo(g=z(4, 6, dtype=torch.bfloat16)),
    "param must be float32, float16 or bfloat16": _lomo(p=z(4, 6, dtype=torch.int32),
                                                        g=z(4, 6, dtype=torch.int32)),
    "param must be contiguous": _lomo(p=z(6, 4).t(), g=z(6, 4).t()),
    "grad must be contiguous": _lomo(g=z(4, 12)[:, ::2]),
    "grad is on": _lomo(g=z(4, 6, device="cpu")),
    "clip_coef must be a 1-element float32": _lomo(coef=z(2)),
    "found_inf must be a 1-element float32": _lomo(found=z(1, dtype=torch.float64)),
    "grad_sq must be a 1-element float32 tensor on meta": _lomo(grad_sq=z(1, device="cpu")),
    "rounding must be 'nearest' or 'stochastic'": _lomo(rounding="up"),
    "workspace must be a contiguous 1-d float32": _lomo(ws=z(2, 8)),
}


def _ada(p=None, row="auto", col="auto", v="auto", stage=0, ws=None, global_numel=0):
    p = z(4, 6) if p is None else p
    shapes = ops.adalomo_state_shapes(p.shape)
    state = {k: z(*s) for k, s in shapes.items()}
    row = state.get("exp_avg_sq_row") if row == "auto" else row
    col = state.get("exp_avg_sq_col") if col == "auto" else col
    v = state.get("exp_avg_sq") if v == "auto" else v
    return (p, torch.zeros_like(p), row, col, v, None, None, 1e-2, 0.0, 1.0, 0.0, 0.5, 1e-30,
            1e-3, 1.0, "nearest", 0, 1, None, ws, stage, 0, global_numel)


ADALOMO_BAD = {
    "exp_avg_sq_row is required for a 2-d parameter": _ada(row=None),
    "exp_avg_sq_col must be float32 of shape": _ada(col=z(5)),
    "exp_avg_sq_row must be float32": _ada(row=z(4, dtype=torch.float64)),
    "exp_avg_sq must be None for a 2-d parameter": _ada(v=z(6)),
    "exp_avg_sq is required for a 1-d parameter": _ada(p=z(6), v=None),
    "exp_avg_sq_row must be None for a 1-d parameter": _ada(p=z(6), row=z(6)),
    "exp_avg_sq_col must be contiguous": _ada(p=z(3, 4), col=z(8)[::2]),
    "stage must be 0": _ada(stage=5),
    "stage 2 needs a workspace": _ada(stage=2),
    "global_rows / global_numel": _ada(global_numel=3),
}


def _multi(k=2, grads=None, lr=None):
    params = [z(5), z(3)][:k]
    grads = [z(5), z(3)][:k] if grads is None else grads
    return (params, grads, None, None, [1e-2] * k if lr is None else lr, [0.0] * k, 1.0,
            [0.0] * k, "nearest", [0] * k, [1] * k)


LOMO_MULTI_BAD = {
    "2 params but 1 grads": _multi(grads=[z(5)]),
    "lr has 3 values for 2 tensors": _multi(lr=[1e-2] * 3),
    "grad shape": _multi(grads=[z(5), z(4)]),
}


def _ada_multi(params, sqs):
    k = len(params)
    return (params, [torch.zeros_like(p) for p in params], sqs, None, None, [1e-2] * k,
            [0.0] * k, 1.0, [0.0] * k, [0.5] * k, [1e-30] * k, [1e-3] * k, [1.0] * k, "nearest",
            [0] * k, [1] * k)


ADALOMO_MULTI_BAD = {
    "takes 0-d and 1-d tensors only": _ada_multi([z(5), z(2, 3)], [z(5), z(2, 3)]),
    "2 params but 1 exp_avg_sqs": _ada_multi([z(5), z(3)], [z(5)]),
    "exp_avg_sq must be float32 of shape": _ada_multi([z(5)], [z(4)]),
}


def _golore(r=None, param=None, m="auto", v="auto", buf=None, inner="adamw", momentum=0.0,
            step=1):
    r = z(8, 4) if r is None else r
    m = z(*r.shape) if m == "auto" else m
    v = z(*r.shape) if v == "auto" else v
    return (r, param, m, v, buf, None, None, inner, 1e-3, 0.0, 1.0, 0.9, 0.999, 1e-8, momentum,
            "nearest", 0, step)


GOLORE_BAD = {
    "r \\(the projected gradient\\) must be float32": _golore(r=z(8, 4, dtype=torch.bfloat16),
                                                             m=z(8, 4), v=z(8, 4)),
    "r \\(the gradient\\) must have param's dtype \\(or float32\\), shape and device": _golore(param=z(8, 5)),
    "exp_avg is required for inner='adamw'": _golore(m=None),
    "momentum_buffer must be None for inner='adamw'": _golore(buf=z(8, 4)),
    "momentum_buffer is required for inner='sgd'": _golore(m=None, v=None, inner="sgd",
                                                           momentum=0.9),
    "exp_avg must be None for inner='sgd'": _golore(v=None, inner="sgd"),
    "step must be >= 1": _golore(step=0),
    "inner must be 'adamw' or 'sgd'": _golore(inner="lion"),
}

CASES = [(LOMO, LOMO_BAD), (ADALOMO, ADALOMO_BAD), (LOMO_MULTI, LOMO_MULTI_BAD),
         (ADALOMO_MULTI, ADALOMO_MULTI_BAD), (GOLORE, GOLORE_BAD)]
GOOD = [(LOMO, _lomo(ws=z(16), grad_sq=z(1))), (ADALOMO, _ada(stage=1, ws=z(64))),
        (ADALOMO, _ada(p=z(6))), (ADALOMO, _ada(p=z(2, 3, 4))), (LOMO_MULTI, _multi()),
        (ADALOMO_MULTI, _ada_multi([z(5), z()], [z(5), z()])), (GOLORE, _golore()),
        (GOLORE, _golore(r=z(8, 4, dtype=torch.bfloat16), param=z(8, 4, dtype=torch.bfloat16),
                         m=z(8, 4), v=z(8, 4))),
        (GOLORE, _golore(r=z(8, 4, dtype=torch.float32), m=None, v=None, inner="sgd"))]


@pytest.mark.parametrize("op,args", GOOD, ids=lambda v: getattr(v, "__name__", ""))
def test_a_right_call_on_meta_tensors_passes(op, args):
    assert op(*args) is None


@pytest.mark.parametrize("op,message", [(op, msg) for op, bad in CASES for msg in bad],
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_a_wrong_call_on_meta_tensors_is_refused(op, message):
    args = dict(CASES)[op][message]
    with pytest.raises(RuntimeError, match=message):
        op(*args)


def test_the_emulated_namespace_has_the_same_checks():
    op = getattr(torch.ops, ops.EMULATED_NAMESPACE).lomo_update_
    with pytest.raises(RuntimeError, match="grad shape"):
        op(*_lomo(g=z(3, 6)))


def test_opcheck_refuses_a_mismatch_the_fake_finds():
    # the fake runs on FakeTensors inside opcheck: a wrong shape fails there as in the kernels
    p, g = torch.zeros(4, 6), torch.zeros(3, 6)
    with pytest.raises(Exception, match="grad shape"):
        torch.library.opcheck(LOMO, (p, g, None, None, 1e-2, 0.0, 1.0, 0.0, "nearest", 0, 1),
                              test_utils=("test_faketensor",))


def test_torch_compile_tracing_refuses_a_mismatch():
    def step(p, g, coef):
        torch.ops.lomo_kernels.lomo_update_(p, g, coef, None, 1e-2, 0.0, 1.0, 0.0, "nearest", 0, 1)
        return p

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    p, g = torch.zeros(4, 6), torch.ones(4, 6)
    compiled(p, g, torch.tensor(1.0))  # traced and run
    assert torch.equal(p, torch.full((4, 6), -1e-2))
    with pytest.raises(RuntimeError, match="clip_coef must be a 1-element float32"):
        compiled(torch.zeros(4, 6), torch.ones(4, 6), torch.ones(3))
