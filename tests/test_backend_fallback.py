"""No silent slow path: "auto" says once per process when it falls back to the pure-PyTorch
reference where a fast backend normally runs, and available_backends() reports Triton as usable
only where it can run."""

import warnings

import pytest
import torch

import lomo_kernels
from lomo_kernels import BackendFallbackWarning, backends, ops


class _NativeWithoutCuda:
    @staticmethod
    def has_cuda():
        return False


@pytest.fixture
def no_native(monkeypatch):
    monkeypatch.setattr(backends, "_native", None)
    monkeypatch.setitem(backends._STATUS, "native",
                        "unavailable: ModuleNotFoundError: No module named 'lomo_kernels._C'")
    monkeypatch.setattr(backends, "_FALLBACK_WARNED", set())


def test_auto_on_cpu_without_the_extension_warns_once(no_native):
    with pytest.warns(BackendFallbackWarning) as w:
        assert ops.resolve_backend("auto", "cpu") == "torch"
    msg = str(w[0].message)
    assert "pure-PyTorch reference on cpu" in msg
    assert "No module named 'lomo_kernels._C'" in msg  # the reason
    assert "pip install --no-build-isolation" in msg  # the fix
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        assert ops.resolve_backend("auto", "cpu") == "torch"  # once per process
        lomo_kernels.Lomo(torch.nn.Linear(2, 2))


def test_optimizer_construction_gives_the_warning(no_native):
    with pytest.warns(BackendFallbackWarning, match="backend='auto' runs the pure-PyTorch"):
        lomo_kernels.AdaLomo(torch.nn.Linear(3, 2))


def test_explicit_torch_backend_is_not_a_fallback(no_native):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        assert ops.resolve_backend("torch", "cpu") == "torch"


def test_auto_on_cuda_without_triton_or_native_cuda_kernels_warns(monkeypatch):
    # resolve_backend only reads what loaded: no GPU is needed to ask about "cuda"
    monkeypatch.setattr(backends, "_native", _NativeWithoutCuda())
    monkeypatch.setattr(backends, "_triton", None)
    monkeypatch.setitem(backends._STATUS, "triton", "unavailable: ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(backends, "_FALLBACK_WARNED", set())
    with pytest.warns(BackendFallbackWarning) as w:
        assert ops.resolve_backend("auto", "cuda") == "torch"
    msg = str(w[0].message)
    assert "on cuda" in msg and "No module named 'triton'" in msg
    assert "built without cuda kernels" in msg and "pip install triton" in msg


def test_other_devices_do_not_warn(no_native):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        assert ops.resolve_backend("auto", "meta") == "torch"


def test_triton_is_reported_usable_only_where_it_can_run(monkeypatch):
    if backends._triton is None:
        pytest.skip(f"Triton did not load here: {backends._STATUS['triton']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    status = lomo_kernels.available_backends()["triton"]
    assert status.startswith("unavailable: no CUDA device")
    assert "TRITON_INTERPRET=1" in status
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert lomo_kernels.available_backends()["triton"] == "loaded"  # (CPU tensors, for tests)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert lomo_kernels.available_backends()["triton"] == "loaded"
