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
