"""GoLore / GaLore on FSDP2 shards: the state each rank holds and the bytes its collectives move,
predicted from a model's shape alone (nothing is run; docs/golore.md has the model).

    python bench/bench_golore_shards.py                       # Llama-3-8B on 8 ranks
    python bench/bench_golore_shards.py --world 4 --ranks 64 128 --model-config llama2-7b

Per rank (the largest shard, rank 0: ceil(m / R) rows), float32 state:
    low-rank weight m x n, rank r, projected on the right (P n x r, replicated):
        n r + 2 ceil(m / R) r               (moments sharded by rows)
    projected on the left (P m x r; moments r x n, replicated):
        m r + 2 r n
    full rank (embeddings and head with the usual exclusions, 1-d): 2 ceil(m / R) n
Collectives (float32 elements, summed over the model's weights):
    every step, left-projected weights: one all-reduce of R (r x n); right-projected weights and
        full-rank parameters: one all-reduce of 1 element (agreement on a non-finite gradient)
    every GaLore (SVD) refresh, k = 2 r, 3 sketch passes (power_iters + 1): right: 3 all-reduces
        of n x k and one all-gather of k x k per rank; left: 4 all-reduces of k x n and 3
        all-gathers of m x k in all (when k >= d there are no passes: right the k x k gather,
        left one all-reduce of k x n)
The layout is cross-checked against the optimizer's own (``_golore_shards._layout``).
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_golore import _matches, _numel, model_shapes  # noqa: E402
from lomo_kernels.optim import _golore_shards  # noqa: E402
from lomo_kernels.optim import projector as proj  # noqa: E402

GIB = 2**30
RECIPE = ("*embed_tokens*", "lm_head.weight")  # full rank, as in lomo_kernels.finetune


def per_rank(shapes: dict, rank: int, world: int, side: str, exclude=RECIPE) -> dict:
    """Predicted float32 elements per rank: projectors, moments (low-rank and full-rank), and
    the collectives of a step and of an SVD refresh."""
    out = dict(projectors=0, moments=0, full=0, step_reduce=0, flags=0, refresh=0, params=0)
    for name, shape in shapes.items():
        rows = -(-shape[0] // world)
        mn = None if _matches(name, exclude) else proj.matrix_shape(shape, rank)
        out["params"] += rows * _numel(shape[1:])
        if mn is None:
            out["full"] += 2 * rows * _numel(shape[1:])
            out["flags"] += 1
            continue
        (m, n), r = mn, rank
        k = min(n if proj.side_of(m, n, side) == "right" else m, 2 * r)
        if proj.side_of(m, n, side) == "right":
            out["projectors"] += n * r
            out["moments"] += 2 * -(-m // world) * r
            out["flags"] += 1
            out["refresh"] += (3 * n * k if k < n else 0) + world * k * k
        else:
            out["projectors"] += m * r
            out["moments"] += 2 * r * n
            out["step_reduce"] += r * n
            out["refresh"] += (4 * k * n + 3 * m * k) if k < m else k * n
    return out


def layout_elements(shapes: dict, rank: int, world: int, side: str, exclude=RECIPE) -> int:
    """The same state count from the optimizer's sharded layout (rank 0's shard)."""
    total = 0
    for name, shape in shapes.items():
        rows = -(-shape[0] // world)
        shard = SimpleNamespace(global_shape=shape, local_shape=(rows,) + tuple(shape[1:]))
        group = {"rank": rank, "low_rank": not _matches(name, exclude), "side": side}
        for _, local, _ in _golore_shards._layout(shard, group, ("exp_avg", "exp_avg_sq")).values():
            total += _numel(local)
    return total


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(prog="python bench/bench_golore_shards.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", default="llama3-8b")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--ranks", type=int, nargs="+", default=[128, 256, 512])
    args = ap.parse_args(argv)
    shapes = model_shapes(args.model_config)
    n = sum(_numel(s) for s in shapes.values())
    print(f"PREDICTED per-rank state, {args.model_config} ({n / 1e9:.2f}e9 parameters) on "
          f"{args.world} ranks, embeddings and head full rank; GiB (float32 state)")
    print("  r    side   projectors  moments(low)  moments(full)  state/rank  bf16 params/rank"
          "  all-reduce/step (+ 1-element ones)  SVD refresh of every weight")
    rows = []
    for r in args.ranks:
        for side in ("auto", "right"):
            e = per_rank(shapes, r, args.world, side)
            state = e["projectors"] + e["moments"] + e["full"]
            assert state == layout_elements(shapes, r, args.world, side), (r, side)
            rows.append((r, side, e))
            print(f"  {r:<4} {side:6} {e['projectors'] * 4 / GIB:10.3f} {e['moments'] * 4 / GIB:12.3f}"
                  f" {e['full'] * 4 / GIB:14.3f} {state * 4 / GIB:11.3f} "
                  f"{e['params'] * 2 / GIB:16.3f} {e['step_reduce'] * 4 / 2**20:13.1f} MiB"
                  f" (+ {e['flags']:3d}) {e['refresh'] * 4 / 2**20:20.1f} MiB")
    one = per_rank(shapes, args.ranks[0], 1, "auto")
    print(f"  (one process, r={args.ranks[0]}: "
          f"{(one['projectors'] + one['moments'] + one['full']) * 4 / GIB:.3f} GiB of state)")
    return rows


if __name__ == "__main__":
    main()
