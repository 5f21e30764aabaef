"""Build the native extension of lomo_kernels (the project metadata is in pyproject.toml).

The native extension ``lomo_kernels._C`` is compiled from ``csrc/`` against the torch installed
in the target environment, so the build must see that torch:

    pip install --no-build-isolation .          # or -e . for a development install

  * CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are always built; a failure (torch not
    importable at build time -- pip's default isolated build hides it --, no C++ compiler, a
    compile error) fails the install with a message that says why and what to do, so that no
    install silently runs the slow pure-PyTorch path.
  * CUDA kernels (``csrc/cuda/*.cu``) are built when torch has CUDA and nvcc is found.
    Architectures come from ``TORCH_CUDA_ARCH_LIST``, else the visible GPU, else a default list
    with PTX for the newest (so a machine without a GPU, such as CI, still compiles them). Without
    nvcc the CPU kernels are built alone (on CUDA, ``backend="auto"`` then uses Triton).
  * the same CUDA kernels compiled as host C++ for the SIMT emulation (``csrc/emulated/``,
    backend ``cuda_emulated``: the CUDA code run on CPU tensors, for tests) when
    ``LOMO_KERNELS_CUDA_EMULATION=1`` (CI sets it); needs no CUDA toolkit.

    The emulated kernels (every ``csrc/emulated/*.cpp`` but the emulator itself) are compiled
    with every load and store instrumented (GCC/Clang ``-fsanitize=kernel-address`` with outline
    callbacks that the emulator implements): the emulator's shared-memory checks (bounds, races,
    initialisation) see each access.

Environment: ``LOMO_KERNELS_PURE_PYTHON=1`` installs without the native extension, on purpose
(no compiler, no torch at build time; ``backend="auto"`` then warns once at run time);
``LOMO_KERNELS_SKIP_CUDA_BUILD=1`` builds the CPU kernels only; ``LOMO_KERNELS_FORCE_BUILD=1``
also fails when the CUDA kernels cannot be built (CI); ``MAX_JOBS`` limits parallel compile jobs;
``CUDA_HOME`` names the CUDA toolkit (otherwise found from the usual places, skipping an ``nvcc``
wrapper script whose folder has no CUDA headers); ``LOMO_KERNELS_SANITIZE=1`` compiles and links
the C++ (CPU and emulated) with AddressSanitizer and UndefinedBehaviorSanitizer (``.ci/sanitize``).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import time

import setuptools
from setuptools import setup
from setuptools.command.build_ext import build_ext

if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject.toml's SPDX license needs it
    raise SystemExit(
        f"lomo_kernels needs setuptools >= 77 to build (found {setuptools.__version__}): "
        "pip install --upgrade setuptools wheel"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
FORCE = os.environ.get("LOMO_KERNELS_FORCE_BUILD", "0") == "1"
PURE_PYTHON = os.environ.get("LOMO_KERNELS_PURE_PYTHON", "0") == "1"
SKIP_CUDA = os.environ.get("LOMO_KERNELS_SKIP_CUDA_BUILD", "0") == "1"
EMULATION = os.environ.get("LOMO_KERNELS_CUDA_EMULATION", "0") == "1"
SANITIZE = os.environ.get("LOMO_KERNELS_SANITIZE", "0") == "1"
DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100, H100/H200, PTX for newer GPUs
# --fmad=false: like -ffp-contract=off for the host, the kernels call fmaf where torch fuses.
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo", "--fmad=false"]


def _log(msg: str) -> None:
    print(f"[lomo_kernels setup] {msg}", file=sys.stderr)


def _fail(msg: str) -> None:
    """Stop the install: building the native extension is required unless opted out."""
    raise SystemExit(
        "\n" + "=" * 79 + f"\nlomo_kernels: cannot build the native extension: {msg}.\n\n"
        "The extension is compiled against the torch installed in your environment, so the\n"
        "build must see that torch (and a C++ compiler). Install with:\n\n"
        "    pip install torch            # first, if it is not installed yet\n"
        "    pip install --no-build-isolation .\n\n"
        "or, to install without the native kernels (the pure-PyTorch reference: much slower; on\n"
        "CUDA, Triton), on purpose:\n\n"
        "    LOMO_KERNELS_PURE_PYTHON=1 pip install .\n" + "=" * 79
    )


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


def _emulated_sources(cuda_sources):
    """csrc/emulated/*.cpp; every csrc/cuda/<name>.cu must have its csrc/emulated/<name>.cpp."""
    wrappers = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob("csrc/emulated/*.cpp")}
    missing = [p for p in cuda_sources if os.path.splitext(os.path.basename(p))[0] not in wrappers]
    if missing:
        raise RuntimeError(
            f"LOMO_KERNELS_CUDA_EMULATION=1: {missing} lack a csrc/emulated/<name>.cpp that "
            "includes cuda/emulation.h and the .cu file"
        )
    return sorted(glob.glob("csrc/emulated/*.cpp"))


def _instrumented(source: str) -> bool:
    """An emulated kernel file (csrc/emulated/<op>.cpp, probes.cpp): its memory accesses go through
    the emulator's shared-memory checks; the emulator and the op registration are not."""
    name = os.path.basename(source)
    return (os.path.dirname(os.path.normpath(source)).endswith(os.path.join("csrc", "emulated"))
            and not name.startswith("emulator") and name != "register.cpp")


def _instrumentation_flags() -> list[str]:
    """Every load and store as a call of __asan_{load,store}<n>_noabort (emulator_shared.cpp):
    the kernel-address flavour needs no sanitizer runtime; no stack or global redzones; and
    __SANITIZE_ADDRESS__ left undefined, so that torch's headers lay out their classes as in every
    other file."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or cpp_extension.get_cxx_compiler()
    params = ["asan-instrumentation-with-call-threshold=0", "asan-stack=0", "asan-globals=0"]
    if "clang" in os.path.basename(compiler):
        tuning = [f for p in params for f in ("-mllvm", "-" + p)]
    else:
        tuning = [f for p in params for f in ("--param", p)]
    # the sanitizer build's -fsanitize=address is replaced here: a file takes one of the two
    return ["-fno-sanitize=address", "-fsanitize=kernel-address", *tuning, "-U__SANITIZE_ADDRESS__"]


def _file_flags(source: str) -> list[str]:
    """The flags a file adds to the common ones: the instrumentation for the emulated kernel files;
    in the sanitizer build, no UBSan for probes.cpp, whose kernels index out of bounds on purpose
    (the emulator's own checks must catch them, not UBSan's bounds check first)."""
    if not _instrumented(source):
        return []
    flags = _instrumentation_flags()
    if SANITIZE and os.path.basename(source) == "probes.cpp":
        flags.append("-fno-sanitize=undefined")
    return flags


def _arch_tokens(arch_list: str) -> str:
    """'8.0;9.0+PTX' -> 'sm_80+sm_90+compute_90' (nvcc splits -D values at commas)."""
    out = []
    for entry in arch_list.replace(" ", ";").split(";"):
        if not entry:
            continue
        num = entry.split("+")[0].replace(".", "")
        if not num.isalnum():
            continue
        out.append(f"sm_{num}")
        if entry.endswith("+PTX"):
            out.append(f"compute_{num}")
    return "+".join(out)


def _extensions():
    """The lomo_kernels._C extension, or [] when it cannot be built here."""
    if PURE_PYTHON:
        _log("LOMO_KERNELS_PURE_PYTHON=1: installing without the native extension")
        return []
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if not sources:
        _fail("its sources (csrc/) are missing from this source tree")
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch in the build environment
        _fail(f"torch is not importable at build time ({type(exc).__name__}: {exc}); pip builds "
              "in an isolated environment without your torch unless given --no-build-isolation")

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
    link = list(openmp)
    if SANITIZE:  # .ci/sanitize: every report an error (-fno-sanitize-recover), symbolised stacks
        sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        cxx = [*cxx, "-O1", *sanitizers, "-fno-omit-frame-pointer", "-g"]
        link += sanitizers
        _log("LOMO_KERNELS_SANITIZE=1: compiled with AddressSanitizer and UndefinedBehaviorSanitizer")
    include_dirs = [os.path.join(HERE, "csrc")]
    # Some headers torch includes (cusparse.h, ...) live in the nvidia pip wheels, not the toolkit.
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            d = os.path.join(site, sub)
            if os.path.isdir(d):
                include_dirs.append(d)
    define_macros = []
    if EMULATION:
        sources += _emulated_sources(cuda_sources)
        define_macros.append(("LOMO_KERNELS_WITH_CUDA_EMULATION", "1"))
        _log("CUDA kernels also compiled for the SIMT emulation (backend cuda_emulated)")
    if with_cuda:
        # torch passes --expt-relaxed-constexpr to every CUDA extension; without it, device code
        # that calls a host-only constexpr function fails to compile instead of relying on an
        # experimental nvcc flag (the kernels mark theirs __host__ __device__)
        cpp_extension.COMMON_NVCC_FLAGS[:] = [
            f for f in cpp_extension.COMMON_NVCC_FLAGS if f != "--expt-relaxed-constexpr"]
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
        define_macros.append(
            ("LOMO_KERNELS_CUDA_ARCHS", _arch_tokens(os.environ["TORCH_CUDA_ARCH_LIST"])))
        ext = cpp_extension.CUDAExtension(
            "lomo_kernels._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "lomo_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    _announce(sources, cuda_sources if with_cuda else [])
    return [ext]


def _announce(sources, cuda_sources) -> None:
    """Say what the build will compile, a line per kind of source, before the compiler's silence:
    pip shows these lines (and each compile command) with ``pip install -v``."""
    emulated = [s for s in sources if s.startswith("csrc/emulated/")]
    cpu = [s for s in sources if s not in emulated]
    _log(f"lomo_kernels._C: {len(sources) + len(cuda_sources)} files to compile, "
         f"MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')}:")
    _log(f"  CPU kernels (C++): {len(cpu)} files")
    if emulated:
        _log(f"  CUDA kernels for the SIMT emulation (C++): {len(emulated)} files")
    if cuda_sources:
        _log(f"  CUDA kernels (nvcc, {os.environ['TORCH_CUDA_ARCH_LIST']}): "
             f"{len(cuda_sources)} files, one pass per architecture")


def _per_file_flags_build():
    """torch's BuildExtension, with the files compiled in groups by their own flags (_file_flags;
    its compile step takes one set of flags for every file)."""
    from torch.utils.cpp_extension import BuildExtension

    class PerFileFlags(BuildExtension):
        def build_extension(self, ext):
            compile_all = self.compiler.compile

            def compile_split(sources, *args, **kwargs):
                groups: dict[tuple, list] = {}
                for s in sources:
                    groups.setdefault(tuple(_file_flags(s)), []).append(s)
                objects = []
                for flags, group in groups.items():
                    post = kwargs.get("extra_postargs")
                    if isinstance(post, dict):
                        post = {**post, "cxx": [*post.get("cxx", []), *flags]}
                    else:
                        post = [*(post or []), *flags]
                    objects += compile_all(group, *args, **{**kwargs, "extra_postargs": post})
                return objects

            self.compiler.compile = compile_split
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_all

    return PerFileFlags


class NativeBuildExt(build_ext):
    """torch's BuildExtension (ninja, MAX_JOBS); a failure stops the install with a clear
    message (see _fail)."""

    def run(self):
        if not self.extensions:
            return
        try:
            build_cls = _per_file_flags_build()
        except Exception as exc:
            _fail(f"torch.utils.cpp_extension is not importable ({exc})")
        impl = build_cls(self.distribution, use_ninja=shutil.which("ninja") is not None)
        for attr in ("build_lib", "build_temp", "inplace", "force", "debug", "parallel",
                     "plat_name", "editable_mode"):
            if hasattr(self, attr):
                setattr(impl, attr, getattr(self, attr))
        impl.extensions = self.extensions
        start = time.monotonic()
        try:
            impl.ensure_finalized()
            impl.run()
            _log(f"compiled lomo_kernels._C in {time.monotonic() - start:.0f} s")
        except Exception as exc:
            _fail(f"compiling it failed ({type(exc).__name__}: {exc}; the compiler output is "
                  "above). A C++ compiler (g++ or clang++) is needed")


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": NativeBuildExt},
)
