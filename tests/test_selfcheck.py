"""The checks that run on the user's machine: the first-use self-check of each kernel (on CUDA by
default; LOMO_KERNELS_SELF_CHECK=all extends it to the CPU, which is how it is tested here) and
``python -m lomo_kernels``. A kernel with an injected bug must be caught, reported loudly, and
replaced by a backend that agrees with the reference."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_cuda_emulation, requires_native
from oracle import bits, rand

import lomo_kernels
from lomo_kernels import backends, doctor, ops, reference, selfcheck


@pytest.fixture(autouse=True)
def fresh_verdicts():
    selfcheck.reset()
    yield
    selfcheck.reset()


def _skips_the_last_element(impl):
    """An off-by-one in the tail: the kernel leaves the last element alone."""
    def broken(param, grad, *args):
        last = param.view(-1)[-1].clone()
        impl(param, grad, *args)
        param.view(-1)[-1] = last
    return broken


@pytest.fixture
def broken_native(monkeypatch):
    raw = backends.raw_impl
    monkeypatch.setattr(backends, "raw_impl", lambda op, backend, device: _skips_the_last_element(
        raw(op, backend, device)) if backend == "native" else raw(op, backend, device))


def _lomo_args(shape=(1000,), dtype=torch.bfloat16):
    return rand(shape, dtype, seed=1), rand(shape, dtype, seed=2), (
        None, None, 0.1, 0.01, 1.0, 0.0, "nearest", 0, 1)


@requires_native
def test_a_disagreeing_kernel_warns_and_the_update_falls_back(monkeypatch, broken_native):
    monkeypatch.setenv("LOMO_KERNELS_SELF_CHECK", "all")
    impl = ops.get_impl("lomo_update_", "native", "cpu")
    p, g, rest = _lomo_args()
    ref = p.clone()
    reference.lomo_update_(ref, g, *rest)
    with pytest.warns(selfcheck.SelfCheckWarning, match="SELF-CHECK FAILED.*native.*cpu"):
        impl(p, g, *rest)
    assert torch.equal(bits(p), bits(ref))  # this call already ran on the fallback
    p2, g2, rest2 = _lomo_args((37, 129), torch.float32)
    ref2 = p2.clone()
    reference.lomo_update_(ref2, g2, *rest2)
    impl(p2, g2, *rest2)  # a later call (another dtype): the fallback, no check, no warning
    assert torch.equal(p2, ref2)
    with pytest.raises(RuntimeError, match="disabled for this process: its self-check disagreed"):
        ops.get_impl("adalomo_update_", "native", "cpu")
    assert ops.resolve_backend("auto", "cpu") == "torch"


@requires_native
def test_the_optimizer_keeps_training_on_the_fallback(monkeypatch, broken_native):
    monkeypatch.setenv("LOMO_KERNELS_SELF_CHECK", "all")

    def train(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        opt = lomo_kernels.Lomo(model, lr=0.05, backend=backend)
        x, y = torch.randn(4, 8), torch.randn(4, 2)
        for _ in range(3):
            opt.fused_backward(torch.nn.functional.mse_loss(model(x), y), lr=0.05)
        return [p.detach().clone() for p in model.parameters()]

    with pytest.warns(selfcheck.SelfCheckWarning):
        got = train("native")
    for a, b in zip(got, train("torch")):
        assert torch.equal(a, b)


@requires_native
def test_a_correct_kernel_passes_once_per_dtype(monkeypatch):
    monkeypatch.setenv("LOMO_KERNELS_SELF_CHECK", "all")
    impl = ops.get_impl("lomo_update_", "native", "cpu")
    p, g, rest = _lomo_args()
    impl(p, g, *rest)
    impl(p, g, *rest)
    assert [k for k in selfcheck._results] == [("lomo_update_", "native", "cpu", torch.bfloat16)]
    assert all(v.ok for v in selfcheck._results.values())


@requires_cuda_emulation
def test_the_emulated_cuda_kernels_pass_the_first_use_check(monkeypatch):
    monkeypatch.setenv("LOMO_KERNELS_SELF_CHECK", "all")
    for dtype in ops.SUPPORTED_DTYPES:
        for op in selfcheck.FIRST_USE_SHAPES:  # the single-tensor ops, golore_update_ included
            verdict = selfcheck.check_kernel(op, ops.get_impl(op, "cuda_emulated", "cpu"), dtype,
                                             torch.device("cpu"))
            assert verdict.ok, verdict.detail


@requires_native
def test_the_check_is_off_on_the_cpu_by_default_and_can_be_turned_off(monkeypatch, broken_native):
    monkeypatch.delenv("LOMO_KERNELS_SELF_CHECK", raising=False)
    assert selfcheck.mode() == "1"
    assert not selfcheck._applies("native", torch.device("cpu"))
    assert selfcheck._applies("native", torch.device("cuda"))
    monkeypatch.setenv("LOMO_KERNELS_SELF_CHECK", "0")
    assert not selfcheck._applies("native", torch.device("cuda"))
    impl = ops.get_impl("lomo_update_", "native", "cpu")
    p, g, rest = _lomo_args()
    impl(p, g, *rest)  # unchecked: the broken kernel runs, and nothing is disabled
    assert ops.resolve_backend("native", "cpu") == "native"
    monkeypatch.setenv("LOMO_KERNELS_SELF_CHECK", "yes")
    with pytest.raises(ValueError, match="LOMO_KERNELS_SELF_CHECK must be"):
        selfcheck.mode()


def test_the_doctor_runs_as_a_new_user_would():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell
    run = subprocess.run([sys.executable, "-m", "lomo_kernels"], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert max(len(line) for line in out.splitlines()) <= doctor.WIDTH, out  # 100 columns
    for needle in ("lomo_kernels", "torch", "triton", "CUDA kernels compiled for", "backend",
                   "self-test against the reference", " 0 disagreements"):
        assert needle in out, needle
    for backend, status in ops.available_backends().items():
        assert backend in out
        if backend in ("native", "cuda_emulated") and status.startswith("loaded"):
            rows = [r for r in out.splitlines()
                    if r.startswith(backend) and "_update_" in r and r.endswith(" ok")]
            assert len(rows) == 15, out  # 3 ops x (fp32 + fp16/bf16 x 2 roundings)


@requires_native
def test_the_doctor_fails_on_a_disagreement(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "SHAPES", [(1031,), (9, 40)])
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the doctor leaves out the interpreter then
    raw = backends.raw_impl
    code = doctor.main([], impl_of=lambda op, backend, device: _skips_the_last_element(
        raw(op, backend, device)) if backend == "native" and op != "golore_update_"
        else raw(op, backend, device))
    out = capsys.readouterr().out
    assert code == 1
    assert max(len(line) for line in out.splitlines()) <= doctor.WIDTH
    flat = " ".join(out.split())  # the long result cells wrap onto continuation lines
    assert "DISAGREES: (1031,): 1 elements differ (element 1030" in flat
    assert "disagreements" in out


def test_the_doctor_without_self_test(capsys):
    assert doctor.main(["--no-self-test"]) == 0
    assert "self-test" not in capsys.readouterr().out


def test_the_doctors_tables_wrap_long_cells_to_100_columns():
    reason = "unavailable: " + " ".join(f"word{i}" for i in range(60))
    table = doctor._table(("backend", "build", "cpu"), [("triton", reason, "no: " + reason),
                                                        ("native", "loaded", "ok")])
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert len(lines) > 4  # the long cells took several lines
    assert lines[0].split() == ["backend", "build", "cpu"] and lines[1].startswith("-------")
    assert " ".join(lines).split().count("word59") == 2  # nothing was cut
    assert lines[-1].split() == ["native", "loaded", "ok"]
    short = doctor._table(("a", "b"), [("x", "y")])
    assert short.splitlines() == ["a  b", "-  -", "x  y"]  # a narrow table is unchanged


@requires_native
def test_a_multi_tensor_call_follows_the_single_kernels_verdict(monkeypatch, broken_native):
    monkeypatch.setenv("LOMO_KERNELS_SELF_CHECK", "all")
    multi = ops.get_impl("lomo_update_multi_", "native", "cpu")
    ps = [rand((300,), torch.bfloat16, seed=5), rand((7,), torch.bfloat16, seed=6)]
    gs = [rand((300,), torch.bfloat16, seed=7), rand((7,), torch.bfloat16, seed=8)]
    refs = [p.clone() for p in ps]
    for r, g in zip(refs, gs):
        reference.lomo_update_(r, g, None, None, 0.1, 0.01, 1.0, 0.0, "nearest", 0, 1)
    with pytest.warns(selfcheck.SelfCheckWarning, match="lomo_update_ bfloat16"):
        multi(ps, gs, None, None, [0.1, 0.1], [0.01, 0.01], 1.0, [0.0, 0.0], "nearest", [0, 0],
              [1, 1])
    assert all(torch.equal(bits(p), bits(r)) for p, r in zip(ps, refs))  # ran on the fallback
