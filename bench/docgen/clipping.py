"""docs/clipping.md: what each clipping mode costs, and the safety net's record."""

from __future__ import annotations

from bench.docgen.common import CPU, GIB, MIB, Results, source as _source


def clip_cost(res: Results) -> str:
    """Inline: what a step costs with each clipping mode, relative to an unclipped one."""
    rows = res(f"{CPU}/clip_modes.json")["rows"]
    exact = sorted(r["ratio_to_unclipped"] for r in rows if r["mode"] == "exact")
    prev = sorted(r["ratio_to_unclipped"] for r in rows if r["mode"] == "previous")
    return (f"a step with exact clipping takes {exact[0]:.2f}-{exact[-1]:.2f}x an unclipped one "
            f"(a second backward), with `clip_mode=\"previous\"` {prev[0]:.2f}-{prev[-1]:.2f}x "
            "(docs/results.md, \"Clipping modes\")")
