"""Host cost of the Triton launchers, measured without a GPU.

For each op the launcher is called on CPU tensors with its kernel launches stubbed out (recorded,
not run), so what is timed is the Python work the launcher adds per call: argument checks, scalar
rounding, workspace offsets, the multi-tensor table (numpy packing and its one copy). Printed per
call: kernel launches, median microseconds, and Python-level function calls (a count that does
not depend on the machine's load). ``triton_dispatch_us`` is Triton's own per-launch Python work
before the driver call (its binder: argument specialisation, and the cache-key lookup), measured
with Triton's binder for an sm_90 target; a real launch adds the driver call.

    python bench/bench_triton_host.py                    # this checkout
    python bench/bench_triton_host.py --baseline 375207b # and the launchers of another commit
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # nothing runs: kernels stay JIT functions

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NORMS = 65  # Llama-3-8B: 2 RMSNorm weights per layer x 32 + the final one


def _cases(tk):
    """(name, op, call) with inputs built once."""
    from lomo_kernels import ops

    f = lambda n=1: torch.zeros(n)  # noqa: E731
    big = torch.zeros(4096, 4096, dtype=torch.bfloat16)
    vec = torch.zeros(4096, dtype=torch.bfloat16)
    norms = [torch.zeros(4096, dtype=torch.bfloat16) for _ in range(NORMS)]
    vs = [torch.ones(4096) for _ in norms]
    st = {k: torch.ones(s) for k, s in ops.adalomo_state_shapes(big.shape).items()}
    k = len(norms)
    common = dict(clip_coef=f(), found_inf=f(), grad_sq=f())

    def ws(op, shapes):
        numel = getattr(tk, "workspace_numel", None)
        return f(numel(op, shapes)) if numel else None

    w = {op: ws(op, s) for op, s in [("lomo_update_", [big.shape]), ("adalomo_update_", [big.shape]),
                                     ("lomo_update_multi_", [n.shape for n in norms]),
                                     ("adalomo_update_multi_", [n.shape for n in norms])]}
    new = hasattr(tk, "workspace_numel")
    extra = lambda op: (common["grad_sq"], w[op]) if new else ()  # noqa: E731
    cases = [
        ("lomo 4096x4096", lambda: tk.lomo_update_(
            big, big, common["clip_coef"], common["found_inf"], 1e-3, 0.0, 1024.0, 1.0,
            "stochastic", 1, 2, *extra("lomo_update_"))),
        ("adalomo 4096x4096", lambda: tk.adalomo_update_(
            big, big, st["exp_avg_sq_row"], st["exp_avg_sq_col"], None, common["clip_coef"],
            common["found_inf"], 1e-3, 0.0, 1024.0, 1.0, 0.5, 1e-30, 1e-3, 1.0, "stochastic", 1, 2,
            *extra("adalomo_update_"))),
        ("adalomo 4096 (norm)", lambda: tk.adalomo_update_(
            vec, vec, None, None, vs[0], common["clip_coef"], common["found_inf"], 1e-3, 0.0,
            1024.0, 1.0, 0.5, 1e-30, 1e-3, 1.0, "stochastic", 1, 2, *extra("adalomo_update_"))),
    ]
    if new:
        cases += [
            (f"lomo multi {k}x4096", lambda: tk.lomo_update_multi_(
                norms, norms, common["clip_coef"], common["found_inf"], [1e-3] * k, [0.0] * k,
                1024.0, [1.0] * k, "stochastic", [1] * k, [2] * k, common["grad_sq"],
                w["lomo_update_multi_"])),
            (f"adalomo multi {k}x4096", lambda: tk.adalomo_update_multi_(
                norms, norms, vs, common["clip_coef"], common["found_inf"], [1e-3] * k, [0.0] * k,
                1024.0, [1.0] * k, [0.5] * k, [1e-30] * k, [1e-3] * k, [1.0] * k, "stochastic",
                [1] * k, [2] * k, common["grad_sq"], w["adalomo_update_multi_"])),
        ]
    return cases


def _stub(tk, launch_module):
    """Replace every kernel launch by a recorder; returns the list of recorded launches."""
    seen = []
    if launch_module is not None:
        launch_module.launch = lambda kernel, grid, *a, **kw: seen.append((kernel, a, kw))
        return seen

    class Stub:  # older launchers call kernel[grid](...) directly
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append((self.kernel, a, kw))

    for mod in (tk.lomo_update, tk.adalomo_update):
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                setattr(mod, name, Stub(obj))
    return seen


def _python_calls(fn) -> int:
    count = 0

    def prof(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def _triton_dispatch_us(launches) -> float:
    """Triton's binder and cache-key work for the recorded launches, in microseconds."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders = {}
    total = 0.0
    for kernel, args, kwargs in launches:
        jf = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
        if jf.fn not in binders:  # as JITFunction.run: one binder and key cache per kernel
            binders[jf.fn] = (create_function_from_signature(jf.signature, jf.params, backend), {})
        binder, key_cache = binders[jf.fn]
        reps = []
        for _ in range(200):
            t = time.perf_counter()
            _, spec, opts = binder(*args, **kwargs)
            compute_cache_key(key_cache, spec, opts)
            reps.append(time.perf_counter() - t)
        total += statistics.median(reps)
    return total * 1e6


def measure(tk, launch_module, reps=2000):
    rows = []
    seen = _stub(tk, launch_module)
    for name, call in _cases(tk):
        call()  # warm caches (tables, staging buffers)
        seen.clear()
        call()
        launches = list(seen)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        rows.append(dict(case=name, launches=len(launches),
                         launcher_us=statistics.median(times) * 1e6,
                         python_calls=_python_calls(call),
                         triton_dispatch_us=_triton_dispatch_us(launches)))
    return rows


def _load_baseline(commit: str):
    """The triton_kernels package of ``commit``, importable as a subpackage of lomo_kernels."""
    import lomo_kernels

    tmp = Path(tempfile.mkdtemp()) / "triton_baseline"
    tmp.mkdir()
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", commit,
                            "triton_kernels/"], capture_output=True, text=True,
                           check=True).stdout.split()
    for path in files:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"],
                              capture_output=True, text=True, check=True).stdout
        (tmp / Path(path).name).write_text(text)
    spec = importlib.util.spec_from_file_location("lomo_kernels.triton_baseline",
                                                  tmp / "__init__.py",
                                                  submodule_search_locations=[str(tmp)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    lomo_kernels.triton_baseline = module
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="also measure the launchers of this git commit")
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args()
    import lomo_kernels.triton_kernels as tk
    from lomo_kernels.triton_kernels import launch

    results = [("this checkout", measure(tk, launch, args.reps))]
    if args.baseline:
        base = _load_baseline(args.baseline)
        results.append((args.baseline, measure(base, None, args.reps)))
    print(f"load average {os.getloadavg()}; torch {torch.__version__}")
    print(f"{'version':14s} {'case':24s} {'launches':>8s} {'launcher_us':>12s} "
          f"{'python_calls':>12s} {'triton_dispatch_us':>18s}")
    for version, rows in results:
        for r in rows:
            print(f"{version:14s} {r['case']:24s} {r['launches']:8d} {r['launcher_us']:12.1f} "
                  f"{r['python_calls']:12d} {r['triton_dispatch_us']:18.1f}")


if __name__ == "__main__":
    main()
