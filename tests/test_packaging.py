"""Packaging: metadata, license, typing marker, and an install that never silently drops the
native extension (setup.py run as pip's build runs it, without torch)."""

import os
import subprocess
import sys

import pytest

import lomo_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# setup.py as pip's isolated build runs it: no torch importable
_NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
             "runpy.run_path('setup.py', run_name='__main__')")


def _setup_without_torch(**env):
    return subprocess.run([sys.executable, "-c", _NO_TORCH], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_build_without_torch_fails_loudly_with_the_fix():
    r = _setup_without_torch(LOMO_KERNELS_PURE_PYTHON="0")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "cannot build the native extension: torch is not importable at build time" in out
    assert "pip install --no-build-isolation ." in out
    assert "LOMO_KERNELS_PURE_PYTHON=1 pip install ." in out


def test_pure_python_install_is_an_explicit_opt_out():
    r = _setup_without_torch(LOMO_KERNELS_PURE_PYTHON="1")
    assert r.returncode == 0, r.stderr
    assert "lomo_kernels" in r.stdout
    assert "installing without the native extension" in r.stderr


def test_project_metadata():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    project = meta["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert project["dynamic"] == ["version"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lomo_kernels.__version__"}
    assert any(c.startswith("Programming Language :: Python") for c in project["classifiers"])
    assert project["urls"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert "Apache License" in f.read(200)
    changelog = open(os.path.join(ROOT, "CHANGELOG.md")).read()
    assert f"## {lomo_kernels.__version__}" in changelog


def test_typed_package():
    assert os.path.isfile(os.path.join(os.path.dirname(lomo_kernels.__file__), "py.typed"))
    import inspect

    for fn in (lomo_kernels.Lomo.__init__, lomo_kernels.AdaLomo.__init__,
               lomo_kernels.ops.lomo_update_, lomo_kernels.ops.adalomo_update_,
               lomo_kernels.available_backends):
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, fn
        for name, prm in sig.parameters.items():
            if name != "self":
                assert prm.annotation is not inspect.Parameter.empty, (fn, name)


def test_docs_live_in_the_repository():
    for doc in ("docs/spec.md", "docs/design.md"):
        assert os.path.isfile(os.path.join(ROOT, doc)), doc
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "docs/spec.md" in readme and "../shared" not in readme
