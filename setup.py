"""Build and install lomo_kernels.

Always installs the pure-Python package (``lomo_kernels``, with the top-level ``triton_kernels/``
folder installed as ``lomo_kernels.triton_kernels``). The native extension ``lomo_kernels._C`` is
optional and built from ``csrc/`` when possible:

  * CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) whenever torch is importable at build time
    and a C++ compiler works (install with ``pip install --no-build-isolation .`` so the build
    sees the installed torch);
  * CUDA kernels (``csrc/cuda/*.cu``) when torch has CUDA and nvcc is found. Architectures come
    from ``TORCH_CUDA_ARCH_LIST``, else the visible GPU, else a default list with PTX for the
    newest (so a machine without a GPU, such as CI, still compiles them).

Environment: ``LOMO_KERNELS_SKIP_CUDA_BUILD=1`` builds the CPU kernels only;
``LOMO_KERNELS_FORCE_BUILD=1`` fails loudly instead of falling back to the pure-Python package;
``MAX_JOBS`` limits parallel compile jobs; ``CUDA_HOME`` names the CUDA toolkit (otherwise found
from the usual places, skipping an ``nvcc`` wrapper script whose folder has no CUDA headers).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
FORCE = os.environ.get("LOMO_KERNELS_FORCE_BUILD", "0") == "1"
SKIP_CUDA = os.environ.get("LOMO_KERNELS_SKIP_CUDA_BUILD", "0") == "1"
DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100, H100/H200, PTX for newer GPUs
# --fmad=false: like -ffp-contract=off for the host, the kernels call fmaf where torch fuses.
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo", "--fmad=false"]


def _log(msg: str) -> None:
    print(f"[lomo_kernels setup] {msg}", file=sys.stderr)


def _fail_or_warn(msg: str) -> None:
    if FORCE:
        raise RuntimeError(f"LOMO_KERNELS_FORCE_BUILD=1: {msg}")
    warnings.warn(f"lomo_kernels: {msg}; installing without it")
    _log(msg)


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root: the folder whose include/ has cuda_runtime.h."""

    def ok(root):
        return root and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))

    for key in ("CUDA_HOME", "CUDA_PATH"):
        if ok(os.environ.get(key)):
            return os.environ[key]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(nvcc, errors="ignore") as f:
                for word in f.read(4096).split():
                    if word.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if ok(c):
            return c
    return None


def _extensions():
    """The lomo_kernels._C extension, or [] when it cannot be built here."""
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if not sources:
        return []
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch in the build environment
        _fail_or_warn(
            f"torch is not importable at build time ({exc}); the native extension needs "
            "`pip install --no-build-isolation .`"
        )
        return []

    with_cuda = bool(cuda_sources) and not SKIP_CUDA and torch.version.cuda is not None
    if with_cuda and cpp_extension.CUDA_HOME is None:
        msg = "torch has CUDA but nvcc / the CUDA toolkit was not found (set CUDA_HOME)"
        if FORCE:
            raise RuntimeError(f"LOMO_KERNELS_FORCE_BUILD=1: {msg}")
        _log(msg + ": building the CPU kernels only")
        with_cuda = False

    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    # C++20: the headers of recent torch releases need it. No fast-math: the kernels must round
    # like torch. -ffp-contract=off keeps a*b+c two roundings unless the code asks for fma (the
    # reference's torch.add(x, y, alpha) is one fma); -fno-math-errno lets sqrt vectorise.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-math-errno", *openmp]
    include_dirs = [os.path.join(HERE, "csrc")]
    # Some headers torch includes (cusparse.h, ...) live in the nvidia pip wheels, not the toolkit.
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            d = os.path.join(site, sub)
            if os.path.isdir(d):
                include_dirs.append(d)
    define_macros = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            archs = DEFAULT_ARCHS
            try:
                if torch.cuda.is_available():
                    major, minor = torch.cuda.get_device_capability()
                    archs = f"{major}.{minor}+PTX"
            except Exception:
                pass
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        _log(f"CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        define_macros.append(("LOMO_KERNELS_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "lomo_kernels._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
            extra_link_args=openmp,
        )
    else:
        ext = cpp_extension.CppExtension(
            "lomo_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
        )
    return [ext]


class OptionalBuildExt(build_ext):
    """torch's BuildExtension (ninja, MAX_JOBS) that falls back to pure Python on failure."""

    def run(self):
        try:
            from torch.utils.cpp_extension import BuildExtension
        except Exception as exc:
            _fail_or_warn(f"cannot build the native extension ({exc})")
            return
        impl = BuildExtension(self.distribution, use_ninja=shutil.which("ninja") is not None)
        for attr in ("build_lib", "build_temp", "inplace", "force", "debug", "parallel",
                     "plat_name", "editable_mode"):
            if hasattr(self, attr):
                setattr(impl, attr, getattr(self, attr))
        impl.extensions = self.extensions
        try:
            impl.ensure_finalized()
            impl.run()
        except Exception as exc:
            _fail_or_warn(f"building the native extension failed ({exc})")

    def get_outputs(self):
        # A failed optional build produces no outputs; do not claim any.
        return [o for o in super().get_outputs() if os.path.exists(o)]


setup(
    name="lomo_kernels",
    version="0.1.0",
    description="Fused LOMO / AdaLomo optimizer updates inside the backward pass "
    "(C++/CUDA, Triton and PyTorch backends)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["lomo_kernels", "lomo_kernels.optim", "lomo_kernels.triton_kernels"],
    package_dir={"lomo_kernels.triton_kernels": "triton_kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        "torch>=2.4",
        "numpy",  # the Triton multi-tensor ops pack their per-tensor tables with it
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "tqdm",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "lomo-optim==0.1.1",
            "transformers",
            "accelerate>=1.1",  # transformers.Trainer needs it (tests/test_trainer.py)
        ],
        "bench": ["matplotlib", "lomo-optim==0.1.1", "transformers"],
    },
    zip_safe=False,
)
