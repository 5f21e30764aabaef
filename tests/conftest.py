"""Shared fixtures and markers. Collection never touches a GPU."""

import fnmatch
import os
from pathlib import Path

# Without a GPU the Triton kernels run in the interpreter on CPU tensors. The choice must be made
# before triton (imported by lomo_kernels) decorates any kernel.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from default_run import EXTENDED  # noqa: E402

from lomo_kernels import ops  # noqa: E402

# .ci/sanitize runs the tests on an extension built apart: a run that imported another one would
# pass without having checked anything.
if os.environ.get("LOMO_KERNELS_EXPECT_EXTENSION"):
    import lomo_kernels._C as _C

    if os.path.realpath(_C.__file__) != os.path.realpath(os.environ["LOMO_KERNELS_EXPECT_EXTENSION"]):
        raise pytest.UsageError(f"LOMO_KERNELS_EXPECT_EXTENSION: the tests imported {_C.__file__}, "
                                f"not {os.environ['LOMO_KERNELS_EXPECT_EXTENSION']}")

if ops.available_backends()["triton"].startswith("loaded"):
    import interpreter_poison

    if interpreter_poison.enabled():  # masked lanes without other= read NaN in every test
        interpreter_poison.install()

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif(
    not ops.available_backends()["triton"].startswith("loaded"),
    reason=f"Triton backend: {ops.available_backends()['triton']}",
)
requires_native = pytest.mark.skipif(
    not ops.available_backends()["native"].startswith("loaded"),
    reason=f"native backend: {ops.available_backends()['native']}",
)

requires_cuda_emulation = pytest.mark.skipif(
    not ops.available_backends()["cuda_emulated"].startswith("loaded"),
    reason=f"cuda_emulated backend: {ops.available_backends()['cuda_emulated']}",
)

ODD_SIZES = [1, 7, 4097, 278011]

# Where the native kernels of csrc/ run: "cpu" (the C++ kernels), "cuda_emulated" (the CUDA kernels
# in the SIMT emulation, on CPU tensors: how CI runs them) and, with a GPU, "cuda".
NATIVE_TARGETS = ["cpu", pytest.param("cuda_emulated", marks=requires_cuda_emulation)] + (
    ["cuda"] if torch.cuda.is_available() else []
)


def target_device(target: str) -> str:
    """The device of a native target's tensors."""
    return "cuda" if target == "cuda" else "cpu"


def target_op(target: str, op: str):
    """The op that runs ``target``'s kernel (the dispatcher picks CPU or CUDA by the tensors)."""
    namespace = ops.EMULATED_NAMESPACE if target == "cuda_emulated" else "lomo_kernels"
    return getattr(getattr(torch.ops, namespace), op)


@pytest.fixture
def one_thread():
    """Small matrices: one thread is faster and steadier than OpenMP threads on a shared CPU.
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)"""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two fp16/bf16 tensors."""
    assert a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)

    def line(x):  # sign-magnitude bit pattern -> monotonic integer line
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (line(a) - line(b)).abs()


def results_per_cpu_isa(script: str, tmp_path) -> dict:
    """Runs ``script`` (Python, with a ``{path}`` to ``torch.save`` its result to) in a fresh
    process for each CPU clone of the native kernels: LOMO_KERNELS_CPU_ISA=base, avx2, and the
    default (the best this CPU has). Returns {"base": ..., "avx2": ..., "default": ...}."""
    import subprocess
    import sys

    results = {}
    for isa in ("base", "avx2", "default"):
        path = str(tmp_path / f"{isa}.pt")
        env = dict(os.environ)
        env.pop("LOMO_KERNELS_CPU_ISA", None)
        if isa != "default":
            env["LOMO_KERNELS_CPU_ISA"] = isa
        subprocess.run([sys.executable, "-c", script.format(path=path)], env=env, check=True)
        results[isa] = torch.load(path)
    return results


# What a test's "backend" or "target" parameter runs, as a marker (backend_<name>, registered in
# pyproject.toml): `-m backend_triton` selects every test of the Triton backend in every file.
_TARGET_BACKEND = {"cpu": "native", "cuda": "native", "cuda_emulated": "cuda_emulated"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    _mark_extended(config, items)
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        backend = params.get("backend")
        name = getattr(backend, "name", backend)
        if name is None:
            name = _TARGET_BACKEND.get(params.get("target"))
        if isinstance(name, str) and name in ops.BACKENDS and name != "auto":
            item.add_marker(f"backend_{name}")


def _mark_extended(config, items):
    """tests/default_run.py's cases get the extended marker; a stale pattern is an error (only when
    the whole tests/ folder is collected: a run of one file matches few patterns)."""
    used = set()
    for item in items:
        for pattern in EXTENDED:
            if fnmatch.fnmatchcase(item.nodeid, pattern):
                item.add_marker(pytest.mark.extended)
                used.add(pattern)
    here = Path(__file__).resolve().parent
    whole = [Path(a).resolve() for a in config.args] == [here]
    stale = sorted(set(EXTENDED) - used)
    if whole and stale:
        raise pytest.UsageError(f"tests/default_run.py: patterns match no test: {stale}")


# Tables of the static GPU budgets (lomo_kernels/budgets.py), filled by the tests that read compiled
# sm_90 code and printed at the end of the run, so that CI's output shows them.
BUDGET_TABLES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    for table in BUDGET_TABLES:
        terminalreporter.write_sep("-", table.splitlines()[0])
        terminalreporter.write_line("\n".join(table.splitlines()[1:]))
