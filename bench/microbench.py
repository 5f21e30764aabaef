"""The microbenchmark loop shared by every per-op script (bench_lomo_update.py,
bench_adalomo_update.py): for each dtype and shape, fresh parameters, every implementation timed
on them, one result row each; and the command line those scripts share with run.py.

An op script is a module with ``OP`` (the op name), ``REFERENCES`` (the implementations every
row's speed-ups are computed against), ``grad_std(dtype)`` (the spread of the stored gradients),
``candidate_names(device, dtype, backends)``, ``candidates(device, dtype, params, grads,
backends)`` (a list of ``Candidate``) and ``same_bytes_stream(params, grads)`` (the reference of
the bandwidth fraction, bench/same_bytes.py)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from bench import memprobe, same_bytes, shapes, timing
from bench.environment import environment
from bench.report import format_table
from bench.results import Row, add_speedups, skipped_rows


@dataclasses.dataclass
class Candidate:
    """One implementation to time. ``setup()`` returns ``(fn, state)``: ``fn()`` runs one update
    of every parameter, ``state()`` lists the persistent optimizer state (counted once it exists,
    after warm-up)."""

    backend: str
    kind: str  # "kernel" (this project) | "reference"
    setup: Callable[[], tuple[Callable[[], object], Callable[[], list]]] | None
    note: str = ""


def kernel_backends(device, only: Sequence[str] | None = None) -> list[str]:
    """This project's backends that loaded and can run on ``device`` (Triton: CUDA only here;
    the interpreter is a test vehicle, not something to time)."""
    from lomo_kernels import ops

    device = torch.device(device)
    out = []
    for b in ("native", "triton", "torch"):
        if only and b not in only:
            continue
        if b == "triton" and device.type != "cuda":
            continue
        try:
            ops.resolve_backend(b, device)
        except RuntimeError:
            continue
        out.append(b)
    return out


def hook_buffers(op: str, params, backend: str, device) -> dict:
    """The buffers an optimizer's hook passes to ``op`` besides the tensors: the gradient-norm
    accumulator ``grad_sq`` and one workspace for every parameter (``ops.workspace_numel``),
    allocated once, as the optimizers do."""
    from lomo_kernels import ops

    n = ops.workspace_numel(op, [tuple(p.shape) for p in params], backend=backend, device=device)
    return dict(grad_sq=torch.zeros(1, dtype=torch.float32, device=device),
                workspace=torch.zeros(n, dtype=torch.float32, device=device) if n else None)


def measure_case(op, dtype, shape_name, shape_list, candidates: Sequence[Candidate], device, *,
                 timing_kw: dict, stream=None, progress=None,
                 count_bytes: bool = True) -> list[Row]:
    """Time every candidate on the same parameters, each interleaved with ``stream``, the
    same-bytes stream of those parameters (bench/same_bytes.py), when given; one Row each (a
    failure becomes a note)."""
    rows = []
    bytes_min = shapes.fewest_bytes(op, shape_list, dtype) if count_bytes else None
    for c in candidates:
        row = Row(op=op, backend=c.backend, kind=c.kind, dtype=shapes.dtype_name(dtype),
                  shape=shape_name, n_tensors=len(shape_list), numel=shapes.numel_of(shape_list),
                  bytes_min=bytes_min, note=c.note)
        if progress is not None:
            progress.set_postfix_str(f"{op} {row.dtype} {shape_name} {c.backend}", refresh=True)
        fn = state = None
        if c.setup is not None:
            try:
                fn, state = c.setup()
                if stream is not None and bytes_min:
                    t, ref, fractions = same_bytes.time_against_stream(fn, stream, device,
                                                                       **timing_kw)
                    row.set_timing(t)
                    row.set_same_bytes(ref, fractions, same_bytes.implementation(device))
                else:
                    row.set_timing(timing.time_fn(fn, device, **timing_kw))
                row.peak_extra_bytes, row.peak_method = memprobe.peak_extra_bytes(fn, device)
                row.state_bytes = memprobe.tensor_bytes(state())
            except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the rest
                msg = f"failed: {type(exc).__name__}: {exc}".replace("\n", " ")
                row.note = (row.note + "; " if row.note else "") + msg[:300]
            finally:
                fn = state = None
                memprobe.free_memory(device)
        rows.append(row)
        if progress is not None:
            progress.update(1)
    return rows


def n_measurements(op_module, device, dtypes, shape_list, backends=None) -> int:
    return (sum(len(op_module.candidate_names(device, dt, backends)) for dt in dtypes)
            * len(shape_list))


def run_op(op_module, device, dtypes, shape_specs, *, backends=None, timing_kw=None,
           progress=None) -> list[Row]:
    """Time every implementation of ``op_module`` for each dtype and shape; returns the rows.

    ``dtypes``: torch dtypes or names ("bf16"); ``shape_specs``: tokens ("4096x4096", "llama7b")
    or ``(name, [shape, ...])`` pairs. A case that cannot fit in free memory gives "skipped"
    rows."""
    device = torch.device(device)
    dtypes = [shapes.parse_dtype(d) if isinstance(d, str) else d for d in dtypes]
    shape_specs = [shapes.parse_shape(s) if isinstance(s, str) else s for s in shape_specs]
    timing_kw = timing_kw or timing.timing_defaults(device)
    op = op_module.OP
    rows = []
    for dtype in dtypes:
        for shape_name, shape_list in shape_specs:
            names = op_module.candidate_names(device, dtype, backends)
            need = shapes.memory_needed(shape_list, dtype)
            avail = memprobe.available_memory_bytes(device)
            if avail is not None and need > 0.9 * avail:
                rows += skipped_rows(
                    op, dtype, shape_name, shape_list, [n for n, _ in names],
                    [k for _, k in names],
                    f"skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB free")
                if progress is not None:
                    progress.update(len(names))
                continue
            params, grads = shapes.make_params(shape_list, dtype, device,
                                               g_std=op_module.grad_std(dtype))
            cands = op_module.candidates(device, dtype, params, grads, backends)
            rows += measure_case(op, dtype, shape_name, shape_list, cands, device,
                                 timing_kw=timing_kw, progress=progress,
                                 stream=op_module.same_bytes_stream(params, grads))
            for p in params:
                p.grad = None
            del params, grads, cands
            memprobe.free_memory(device)
    add_speedups(rows, op_module.REFERENCES)
    return rows


# ---------------------------------------------------------------------------------------------
# Command line shared by the op scripts and run.py
# ---------------------------------------------------------------------------------------------


def add_common_args(p) -> None:
    """Arguments every benchmark script accepts (run.py adds its own)."""
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to benchmark on (default: cuda if available, else cpu)")
    p.add_argument("--sizes", choices=sorted(shapes.SIZE_PRESETS), default=None,
                   help="shape preset: tiny (CI, seconds), small (CPU default), full (GPU "
                        "default: 4096, 4096x4096, 4096x11008, 32000x4096, 128256x4096 and the "
                        "whole Llama-7B / Llama-3-8B parameter lists). Presets: "
                        + "; ".join(f"{k}={','.join(v)}" for k, v in shapes.SIZE_PRESETS.items()))
    p.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                   help="explicit shapes, overriding --sizes: e.g. 4096x4096 4096 or "
                        f"comma-separated; whole models: {', '.join(shapes.MODEL_CONFIGS)}")
    p.add_argument("--dtypes", nargs="+", default=None, metavar="DTYPE",
                   help="bf16, fp16, fp32 (space- or comma-separated; default: all three, "
                        "bf16 and fp32 for --sizes tiny)")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="only these implementations (default: all that can run): native, "
                        "triton, torch, lomo_optim, sgd_fused, sgd_foreach, adafactor_foreach, "
                        "adafactor_single")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); default: torch's choice")
    p.add_argument("--warmup-ms", type=float, default=None, help="timer warm-up budget (ms)")
    p.add_argument("--rep-ms", type=float, default=None, help="timer measurement budget (ms)")
    p.add_argument("--min-reps", type=int, default=None, help="at least this many timed calls")


def resolve_common_args(args) -> dict:
    """Turn parsed common arguments into keyword arguments of the ``run`` functions."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ("full" if device.type == "cuda" else "small")
    tokens = shapes.split_list(args.shapes) if args.shapes else shapes.SIZE_PRESETS[sizes]
    shape_specs = [shapes.parse_shape(t) for t in tokens]
    if args.dtypes:
        dtypes = [shapes.parse_dtype(d) for d in shapes.split_list(args.dtypes)]
    elif sizes == "tiny":
        dtypes = [torch.bfloat16, torch.float32]
    else:
        dtypes = [torch.bfloat16, torch.float16, torch.float32]
    timing_kw = timing.timing_defaults(device, sizes)
    for key in ("warmup_ms", "rep_ms", "min_reps"):
        if getattr(args, key, None) is not None:
            timing_kw[key] = getattr(args, key)
    return dict(device=device, dtypes=dtypes, shapes=shape_specs, timing=timing_kw, sizes=sizes,
                backends=shapes.split_list(args.backends) or None)


def op_script_main(op_module, argv=None) -> None:
    """The command line of a single-op microbenchmark script: common flags, run, print a table."""
    import argparse

    ap = argparse.ArgumentParser(description=op_module.__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    kw = resolve_common_args(ap.parse_args(argv))
    env = environment(kw["device"])
    rows = run_op(op_module, kw["device"], kw["dtypes"], kw["shapes"], backends=kw["backends"],
                  timing_kw=kw["timing"])
    print(f"# {env['device_name']} | torch {env['torch_version']} | threads {env['cpu_threads']}"
          f" | load {env['load_avg_1min']}")
    print(format_table(rows))
