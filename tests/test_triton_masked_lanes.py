"""Masked lanes of the Triton kernels never decide a result.

Triton documents the value of a masked-off lane of ``tl.load`` without ``other=`` as undefined;
the interpreter happens to fill it with zeros, so a kernel that sums every lane, or stores a flag
from every lane, passes on CPU and may not on a GPU. Two checks:

* every masked ``tl.load`` of triton_kernels/ names its ``other=``, and no call of a helper that
  passes ``other`` on (``load_lanes``) gives it None (read from the source);
* the kernels run in an interpreter whose masked lanes without ``other=`` read NaN (bf16: its NaN
  pattern, integers: -1), on sizes with partial tiles and rows, and still agree with the reference:
  no NaN in the parameter, the state or ``grad_sq``, and ``found_inf`` stays 0.

The poison is on for every test of the run (tests/conftest.py, interpreter_poison.py), so each
Triton test fails on a missing ``other=`` whose lanes reach a result; the fixture below keeps these
tests poisoned with the mode turned off.
"""

import ast
import pathlib

import interpreter_poison
import pytest
import torch
import triton
import triton.language as tl
from conftest import requires_triton, ulp_distance

from lomo_kernels import ops

pytestmark = requires_triton

TRITON_DIR = pathlib.Path(__file__).resolve().parent.parent / "triton_kernels"


def _is_none(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _lane_loaders(trees) -> dict:
    """{name: position of its ``other`` parameter} of the helpers that pass ``other`` on to a
    masked load (rounding.load_lanes)."""
    out = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                names = [a.arg for a in node.args.args]
                if "other" in names and "mask" in names:
                    out[node.name] = names.index("other")
    return out


def _masked_loads_without_other(path: pathlib.Path, loaders: dict):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        kw = {k.arg: k.value for k in node.keywords}
        if (isinstance(f, ast.Attribute) and f.attr == "load"
                and isinstance(f.value, ast.Name) and f.value.id == "tl"):
            if "mask" in kw and ("other" not in kw or _is_none(kw["other"])):
                yield f"{path.name}:{node.lineno}"
        elif isinstance(f, ast.Name) and f.id in loaders:
            at = loaders[f.id]
            other = node.args[at] if len(node.args) > at else kw.get("other")
            if other is None or _is_none(other):
                yield f"{path.name}:{node.lineno}"


def test_every_masked_triton_load_names_its_other():
    files = sorted(TRITON_DIR.glob("*.py"))
    assert files, TRITON_DIR
    loaders = _lane_loaders(ast.parse(path.read_text()) for path in files)
    assert "load_lanes" in loaders, loaders
    missing = [where for path in files for where in _masked_loads_without_other(path, loaders)]
    assert not missing, f"masked tl.load without other= (masked lanes undefined): {missing}"


@pytest.fixture
def poisoned_masked_lanes(monkeypatch):
    """Masked-off lanes of a tl.load without ``other=`` read NaN (or -1) in the interpreter (for
    the whole run already, unless LOMO_KERNELS_TRITON_POISON=0)."""
    if not interpreter_poison.installed():
        from triton.runtime import interpreter as interp

        builder = interp.InterpreterBuilder
        monkeypatch.setattr(builder, "create_masked_load",
                            interpreter_poison.poisoned(builder.create_masked_load))


@triton.jit
def _sum_of_masked_lanes(x_ptr, out_ptr, n, OTHER: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    if OTHER:
        x = tl.load(x_ptr + i, mask=i < n, other=0.0)
    else:
        x = tl.load(x_ptr + i, mask=i < n)
    tl.store(out_ptr, tl.sum(x))


@pytest.mark.skipif(not interpreter_poison.enabled(), reason="the interpreter's own zeros "
                    f"({interpreter_poison.ENV}=0, or Triton runs on a GPU)")
def test_every_test_sees_poisoned_masked_lanes():
    """The mode tests/conftest.py sets: a sum over a masked load without other= is NaN."""
    x, out = torch.ones(16), torch.zeros(1)
    _sum_of_masked_lanes[(1,)](x, out, 5, OTHER=True, BLOCK=16)
    assert out.item() == 5.0
    _sum_of_masked_lanes[(1,)](x, out, 5, OTHER=False, BLOCK=16)
    assert torch.isnan(out).all()


def _impl(op, backend):
    """``op`` of ``backend`` with the reference's positional signature."""
    return ops.get_impl(op, backend, "cpu")


def _rand(shape, dtype, gen):
    return (torch.randn(shape, generator=gen) * 0.5 + 0.01).to(dtype)


def _check_against_reference(got, want):
    for name in got:
        g, w = got[name], want[name]
        assert not torch.isnan(g).any(), name
        if g.dtype in (torch.float16, torch.bfloat16):
            assert ulp_distance(g, w).max() <= 1, name
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4097,), (9000,), (37, 129), (3, 17, 33)])
def test_lomo_and_adalomo_ignore_masked_lanes(poisoned_masked_lanes, dtype, shape):
    gen = torch.Generator().manual_seed(5)
    p0, g = _rand(shape, dtype, gen), _rand(shape, dtype, gen)
    clip = torch.tensor([0.7])
    results = {}
    for backend in ("torch", "triton"):
        p = p0.clone()
        found, gsq = torch.zeros(1), torch.zeros(1)
        _impl("lomo_update_", backend)(p, g.clone(), clip, found, 1e-2, 0.1, 1.0, 0.0,
                                       "nearest", 3, 1, gsq)
        assert found.item() == 0.0, backend
        results[backend] = {"p": p, "grad_sq": gsq}
    _check_against_reference(results["triton"], results["torch"])

    state_shapes = ops.adalomo_state_shapes(shape)
    beta = 1.0 - 2 ** -0.8
    results = {}
    for backend in ("torch", "triton"):
        p = p0.clone()
        st = {k: torch.rand(s, generator=torch.Generator().manual_seed(9)) + 0.5
              for k, s in state_shapes.items()}
        found, gsq = torch.zeros(1), torch.zeros(1)
        _impl("adalomo_update_", backend)(
            p, g.clone(), st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"),
            st.get("exp_avg_sq"), clip, found, 1e-2, 0.1, 1.0, 0.0, beta, 1e-30, 1e-3, 1.0,
            "nearest", 3, 2, gsq)
        assert found.item() == 0.0, backend
        results[backend] = {"p": p, "grad_sq": gsq, **st}
    _check_against_reference(results["triton"], results["torch"])


def test_multi_tensor_ops_ignore_masked_lanes(poisoned_masked_lanes):
    gen = torch.Generator().manual_seed(6)
    shapes = [(7,), (4097,), (1,), (300,)]
    p0 = [_rand(s, torch.bfloat16, gen) for s in shapes]
    g = [_rand(s, torch.bfloat16, gen) for s in shapes]
    k = len(shapes)
    for op in ("lomo_update_multi_", "adalomo_update_multi_"):
        results = {}
        for backend in ("torch", "triton"):
            ps = [p.clone() for p in p0]
            found, gsq = torch.zeros(1), torch.zeros(1)
            if op == "lomo_update_multi_":
                _impl(op, backend)(ps, [x.clone() for x in g], None, found, [1e-2] * k,
                                   [0.1] * k, 1.0, [0.0] * k, "nearest", [1] * k, [1] * k, gsq)
                extra = {}
            else:
                vs = [torch.full(s, 0.5) for s in shapes]
                _impl(op, backend)(ps, [x.clone() for x in g], vs, None, found, [1e-2] * k,
                                   [0.1] * k, 1.0, [0.0] * k, [0.5] * k, [1e-30] * k,
                                   [1e-3] * k, [1.0] * k, "nearest", [1] * k, [2] * k, gsq)
                extra = {f"v{i}": v for i, v in enumerate(vs)}
            assert found.item() == 0.0, (op, backend)
            results[backend] = {**{f"p{i}": p for i, p in enumerate(ps)}, "grad_sq": gsq,
                                **extra}
        _check_against_reference(results["triton"], results["torch"])


def test_golore_ignores_masked_lanes(poisoned_masked_lanes):
    gen = torch.Generator().manual_seed(7)
    r0 = torch.randn(37, 5, generator=gen)
    results = {}
    for backend in ("torch", "triton"):
        r = r0.clone()
        m, v = torch.zeros_like(r), torch.zeros_like(r)
        found = torch.zeros(1)
        _impl("golore_update_", backend)(r, None, m, v, None, None, found, "adamw", 1e-2, 0.0,
                                         1.0, 0.9, 0.999, 1e-8, 0.0, "nearest", 0, 1)
        assert found.item() == 0.0, backend
        results[backend] = {"r": r, "m": m, "v": v}
    _check_against_reference(results["triton"], results["torch"])
