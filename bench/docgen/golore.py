"""docs/golore.md: the optimizer state of the Llama-3-8B shape, computed by bench/bench_golore.py
from the shapes (a prediction, nothing measured)."""

from __future__ import annotations

from bench import summary
from bench.docgen.common import GIB, Results

MODEL, RANKS, RECIPE = "llama3-8b", (128, 256, 512), ("*embed_tokens*", "lm_head.weight")


def state_table(res: Results) -> str:
    from bench import bench_golore as bg

    shapes = bg.model_shapes(MODEL)
    n = sum(bg._numel(s) for s in shapes.values())
    rows = [("AdamW (float32 moments)", bg.state_bytes("adamw", shapes), 2),
            ("AdaLomo (factored second moment)", bg.state_bytes("adalomo", shapes), 3)]
    rows += [(f"GoLore r = {r}, every 2-D weight low-rank", bg.state_bytes("golore", shapes, r), 2)
             for r in RANKS]
    rows += [(f"GoLore r = {r}, embeddings + head full rank"
              + (" (GaLore's recipe)" if r == RANKS[0] else ""),
              bg.state_bytes("golore", shapes, r, RECIPE), 2) for r in RANKS]
    return summary.markdown(["optimizer", "state", "bytes / parameter"],
                            [[name, f"{b / GIB:.{d}f} GiB", f"{b / n:.3f}"] for name, b, d in rows])


def recipe_state(res: Results) -> str:
    """GaLore's recipe at the first rank, on one process."""
    from bench import bench_golore as bg

    b = bg.state_bytes("golore", bg.model_shapes(MODEL), RANKS[0], RECIPE)
    return f"{b / GIB:.2f} GiB of state at r = {RANKS[0]}"


SVD_SHAPES = {(1024, 4096): "k, v", (4096, 4096): "q, o", (14336, 4096): "gate, up, down",
              (128256, 4096): "embed., head"}  # Llama-3-8B's weight shapes (down transposed)


def _mib(b: int) -> str:
    return f"{b / 2**20:.0f} MiB"


def svd_working_set(res: Results) -> str:
    """bench/bench_golore.py's working set of one SVD refresh (on the meta device: every tensor
    the refresh creates, nothing run) against GaLore's float32 copy and full SVD outputs."""
    from bench import bench_golore as bg

    rows = []
    for shape, label in SVD_SHAPES.items():
        cells = [f"{shape[0]} x {shape[1]} ({label})", ">= " + _mib(bg.galore_svd_bytes(shape))]
        for r in RANKS:
            cpu, cuda = bg.svd_working_set(shape, r)
            cells.append(f"{_mib(cuda)} (CPU {cpu / 2**20:.0f})")
        rows.append(cells)
    return summary.markdown(["weight", "GaLore"] + [f"r = {r}" for r in RANKS], rows)


def svd_example(res: Results) -> str:
    from bench import bench_golore as bg

    shape = (14336, 4096)
    return (f"an exact SVD of a {shape[0]} x {shape[1]} bf16 gradient holds at least "
            f"{_mib(bg.galore_svd_bytes(shape))}; the randomized one about "
            f"{_mib(bg.svd_working_set(shape, RANKS[0])[1])} at r = {RANKS[0]}")


WORLD = 8


def _size(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / 2**20:.0f} MiB"


def shards_table(res: Results) -> str:
    """bench/bench_golore_shards.py's per-rank prediction on WORLD ranks, GaLore's recipe."""
    from bench import bench_golore_shards as bs

    shapes = bs.model_shapes(MODEL)
    rows = []
    for r in RANKS:
        for side in ("auto", "right"):
            e = bs.per_rank(shapes, r, WORLD, side)
            state = e["projectors"] + e["moments"] + e["full"]
            reduce = (_size(4 * e["step_reduce"]) + " + " if e["step_reduce"] else "") \
                + f"{e['flags']} x 4 B"
            rows.append([r, side] + [f"{4 * e[k] / GIB:.3f} GiB" for k in
                                     ("projectors", "moments", "full")]
                        + [f"{4 * state / GIB:.2f} GiB", f"{2 * e['params'] / GIB:.2f} GiB",
                           reduce, f"{4 * e['refresh'] / GIB:.1f} GiB"])
    return summary.markdown(["r", "side", "projectors", "low-rank moments", "full-rank moments",
                             "state / rank", "bf16 parameters / rank", "all-reduce per step",
                             "one SVD refresh of every weight"], rows)


def shards_comparison(res: Results) -> str:
    """The gradients FSDP reduce-scatters per step, and an SVD refresh spread over its period."""
    import inspect

    from bench import bench_golore_shards as bs
    from lomo_kernels import GoLore

    shapes = bs.model_shapes(MODEL)
    grads = 2 * sum(bs._numel(s) for s in shapes.values())
    gap = inspect.signature(GoLore).parameters["update_proj_gap"].default
    refresh = 4 * bs.per_rank(shapes, RANKS[0], WORLD, "auto")["refresh"]
    return (f"for comparison the bf16 gradients FSDP reduce-scatters every step are "
            f"{grads / GIB:.0f} GiB. An SVD refresh happens every T steps ({gap} by default): at "
            f"r = {RANKS[0]} about {refresh / gap / 2**20:.0f} MiB per step on average")
