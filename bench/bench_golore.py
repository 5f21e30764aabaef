"""GoLore / GaLore: optimizer state bytes and the SVD refresh's working set for a real model shape,
and the time of one low-rank update on this machine.

    python bench/bench_golore.py                          # Llama-3-8B shapes, ranks 128 256 512
    python bench/bench_golore.py --model-config llama2-7b --ranks 64 128
    python bench/bench_golore.py --time-shape 4096x14336 --time-rank 128 --threads 2

State bytes come from the optimizers' own state layouts applied to the model's parameter shapes
(built on the meta device: no memory, no weights): AdamW two float32 moments per parameter,
AdaLomo its factored second moments (``ops.adalomo_state_shapes``), GoLore the float32 projector
(min(m, n) x r) and moments (max(m, n) x r each, adamw) of every low-rank weight plus full-rank
AdamW moments for the rest. Two GoLore layouts: every 2-D weight low-rank, and GaLore's usual
recipe (embeddings and output head full rank).

The SVD refresh's working set is measured by running ``projector.svd_projector`` on meta tensors
of each weight shape under ``lomo_kernels.memory.AllocationTracker`` (every tensor it creates,
nothing computed), next to what GaLore's own refresh holds at least: a float32 copy of the
gradient plus the outputs of ``torch.linalg.svd(full_matrices=False)``.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lomo_kernels import GoLore, finetune, ops  # noqa: E402
from lomo_kernels.memory import AllocationTracker  # noqa: E402
from lomo_kernels.optim import projector as proj  # noqa: E402

GIB = 2**30


def model_shapes(name: str) -> dict[str, tuple]:
    """Parameter name -> shape of a MODEL_CONFIGS model, built on the meta device."""
    import transformers

    cfg = finetune.build_config(name)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _matches(name: str, patterns) -> bool:
    return any(name == e or fnmatch.fnmatchcase(name, e) for e in patterns)


def state_bytes(kind: str, shapes: dict, rank: int = 0, exclude=()) -> int:
    """Optimizer state bytes (float32 tensors; step counters are Python ints)."""
    total = 0
    for name, shape in shapes.items():
        n = _numel(shape)
        if kind == "adamw":
            total += 2 * n * 4
        elif kind == "adalomo":
            total += sum(_numel(s) for s in ops.adalomo_state_shapes(shape).values()) * 4
        elif kind == "golore":
            m, rest = shape[0], n // shape[0]
            low = len(shape) >= 2 and rank < min(m, rest) and not _matches(name, exclude)
            total += (min(m, rest) + 2 * max(m, rest)) * rank * 4 if low else 2 * n * 4
        else:
            raise ValueError(kind)
    return total


def measured_state_bytes(shapes: dict, rank: int, exclude=()) -> int:
    """The same count from a real GoLore's state, built on the meta device (a cross-check of
    ``state_bytes``): every parameter's state initialised as its first update would."""
    params = {n: torch.nn.Parameter(torch.empty(s, device="meta")) for n, s in shapes.items()}
    model = torch.nn.Module()
    for i, (n, p) in enumerate(params.items()):
        model.register_parameter(f"p{i}", p)
    excluded = [f"p{i}" for i, n in enumerate(params) if _matches(n, exclude)]
    opt = GoLore(model, rank=rank, exclude=excluded)
    for group in opt.param_groups:
        for p in group["params"]:
            mn = opt._matrix_shape(p, group)
            opt._init_state(p, group, opt.state[p], mn)
            if mn is not None:
                opt.state[p]["projector"] = torch.empty(min(mn), rank, device="meta")
    return finetune.optimizer_state_bytes(opt)


def svd_working_set(shape, rank: int) -> tuple[int, int]:
    """(peak bytes of svd_projector's tensors on a bf16 gradient of ``shape``, the same for the
    CUDA path, which reads the gradient without upcasting a panel)."""
    g = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    side = proj.side_of(*shape)
    old = proj._generator
    proj._generator = lambda device, key: None  # meta has no generator; shapes are all we need
    try:
        with AllocationTracker() as tr:
            proj.svd_projector(g, rank, side, key=0)
    finally:
        proj._generator = old
    d = min(shape)
    panel = min(proj.BLOCK_BYTES, d * max(shape) * 4)  # the CPU path's upcast panel
    return tr.peak, tr.peak - panel


def galore_svd_bytes(shape) -> int:
    """At least what GaLore's refresh allocates: float32 copy of G, U (m x k), S, Vh (k x n)."""
    m, n = shape
    k = min(m, n)
    return (m * n + m * k + k + k * n) * 4


def time_update(shape, rank: int, dtype, reps: int = 10) -> dict:
    """Median ms of one GoLore low-rank update (projection, fused inner update,
    back-projection) of a ``shape`` weight, and of the projection refresh (random and SVD)."""
    m, n = shape
    w = torch.nn.Parameter(torch.randn(shape).to(dtype))
    g = torch.randn(shape).to(dtype)
    out = {}
    for name, projection, gap in (("update", "random", 10**9), ("refresh_random", "random", 1),
                                  ("refresh_svd", "svd", 1)):
        opt = GoLore([w], rank=rank, update_proj_gap=gap, projection=projection)
        group, state = opt.param_groups[0], opt.state[w]
        opt._update(w.data, g.clone(), group, state, 0)  # warm-up (state, first projector)
        ts = []
        for _ in range(reps):
            gg = g.clone()
            t0 = time.perf_counter()
            with torch.no_grad():
                opt._update(w.data, gg, group, state, 0)
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts) * 1e3
        opt.remove_hooks()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python bench/bench_golore.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", default="llama3-8b", choices=sorted(finetune.MODEL_CONFIGS))
    ap.add_argument("--ranks", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--time-shape", default="4096x14336", help="MxN of the timed update ('' off)")
    ap.add_argument("--time-rank", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = model_shapes(args.model_config)
    n_params = sum(_numel(s) for s in shapes.values())
    recipe = ("*embed_tokens*", "lm_head.weight")
    rows = [("AdamW (fp32 moments)", state_bytes("adamw", shapes)),
            ("AdaLomo", state_bytes("adalomo", shapes))]
    for r in args.ranks:
        rows.append((f"GoLore r={r}, every 2-D weight", state_bytes("golore", shapes, r)))
        rows.append((f"GoLore r={r}, embeddings+head full rank",
                     state_bytes("golore", shapes, r, recipe)))
    print(f"optimizer state, {args.model_config} ({n_params / 1e9:.2f}e9 parameters)")
    for name, b in rows:
        print(f"  {name:42s} {b / GIB:8.3f} GiB  ({b / n_params:.3f} B/param)")
    check = measured_state_bytes(shapes, args.ranks[0])
    assert check == state_bytes("golore", shapes, args.ranks[0]), check
    print(f"  (cross-check from a GoLore built on the meta device: {check / GIB:.3f} GiB)")

    print("SVD refresh working set per weight shape (bf16 gradient; MiB)")
    spike = {}
    for shape in sorted({s for s in shapes.values() if len(s) == 2}):
        galore = galore_svd_bytes(shape)
        line = [f"  {shape[0]:>6}x{shape[1]:<6} GaLore's >= {galore / 2**20:9.1f}"]
        for r in args.ranks:
            cpu, cuda = svd_working_set(shape, r)
            spike[(shape, r)] = (cpu, cuda, galore)
            line.append(f"r={r}: {cpu / 2**20:7.1f} (CUDA {cuda / 2**20:6.1f})")
        print("  ".join(line))

    timing = None
    if args.time_shape:
        shape = tuple(int(x) for x in args.time_shape.split("x"))
        timing = time_update(shape, args.time_rank, torch.bfloat16)
        print(f"time of one {args.time_shape} bf16 rank-{args.time_rank} GoLore update on "
              f"{torch.get_num_threads()} threads (load {os.getloadavg()[0]:.1f}): "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in timing.items()))
    return {"rows": rows, "spike": spike, "timing": timing}


if __name__ == "__main__":
    main()
