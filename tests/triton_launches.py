"""What the Triton launchers launch, observed without a GPU.

``capture`` runs launcher calls with ``triton_kernels.launch.launch`` stubbed out: every launch is
recorded (kernel, grid, arguments) and nothing runs, so the calls can use meta tensors of any size
(a whole Llama-3-8B). ``cache_key`` is Triton's own specialisation of a recorded launch (its
binder and cache-key function, as ``JITFunction.run`` computes them for an sm_90 target): two
launches with the same key share one compiled kernel. ``compile_sm90`` compiles a recorded launch
offline exactly as ``JITFunction.run`` would on an H100, and ``resources`` reads registers and
spills from the cubin.
"""

import contextlib
import os
import re
import subprocess
import tempfile

from lomo_kernels.triton_kernels import launch as launch_mod


@contextlib.contextmanager
def capture(run=False):
    """Record every launch (kernel, grid, args, kwargs); ``run``: also launch them."""
    seen = []
    original = launch_mod.launch

    def record(kernel, grid, *args, **kwargs):
        seen.append((kernel, grid, args, kwargs))
        if run:
            original(kernel, grid, *args, **kwargs)

    launch_mod.launch = record
    try:
        yield seen
    finally:
        launch_mod.launch = original


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


_JIT: dict = {}


def jit_function(kernel):
    """The JITFunction behind ``kernel`` (the interpreter wraps the same function)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    if kernel.fn not in _JIT:
        _JIT[kernel.fn] = JITFunction(kernel.fn, **kernel.kwargs)
    return _JIT[kernel.fn]


_BINDERS: dict = {}


def _binder(jf):
    """(backend, binder, key cache) of ``jf`` for sm_90, as JITFunction keeps per device."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if jf.fn not in _BINDERS:
        backend = make_backend(_target())
        _BINDERS[jf.fn] = (backend, create_function_from_signature(jf.signature, jf.params,
                                                                   backend), {})
    return _BINDERS[jf.fn]


def cache_key(kernel, args, kwargs) -> str:
    """Triton's compiled-kernel cache key of one launch (JITFunction.run, less the device)."""
    from triton.runtime.jit import compute_cache_key

    _, binder, key_cache = _binder(jit_function(kernel))
    _, specialization, options = binder(*args, **kwargs)
    return compute_cache_key(key_cache, specialization, options)


def compile_sm90(kernel, args, kwargs):
    """Compile one recorded launch for sm_90 as JITFunction.run would (no GPU needed)."""
    import triton

    jf = jit_function(kernel)
    backend, binder, _ = _binder(jf)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jf._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    src = jf.ASTSource(jf, signature, constexprs, attrs) if hasattr(jf, "ASTSource") else \
        triton.compiler.ASTSource(jf, signature, constexprs, attrs)
    return triton.compile(src, target=_target(), options=options.__dict__)


def _cuobjdump():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(compiled) -> dict:
    """{"registers", "stack", "local"} of a compiled kernel's cubin (cuobjdump -res-usage):
    spills show as stack/local bytes."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]),
            "local": int(fields["LOCAL"])}
