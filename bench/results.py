"""Result rows of the microbenchmarks and the whole-backward benchmark, the speed-up columns, and
the JSON / CSV writers."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Sequence

from bench.shapes import dtype_name, fewest_bytes, numel_of
from bench.timing import Timing

# Names of the references whose time every row of the same (op, dtype, shape) is compared with,
# and the key the ratio gets in the row: speedup_vs_X = time(X) / time(this row).
SPEEDUP_KEYS = {
    "lomo_optim": "speedup_vs_lomo_optim",
    "torch": "speedup_vs_torch_backend",
    "sgd_fused": "speedup_vs_sgd_fused",
    "sgd_foreach": "speedup_vs_sgd_foreach",
    "adafactor_foreach": "speedup_vs_adafactor_foreach",
    "adafactor_single": "speedup_vs_adafactor_single",
}


@dataclasses.dataclass
class Row:
    op: str  # lomo_update | adalomo_update | backward_plain | backward_lomo | backward_adalomo
    backend: str  # native | triton | torch | lomo_optim | sgd_fused | adafactor_... | none
    kind: str  # kernel (this project) | reference | backward
    dtype: str
    shape: str  # "4096x4096", or a model name for whole-model passes
    n_tensors: int
    numel: int
    bytes_min: int | None = None  # the fewest bytes (docs/spec.md)
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    reps: int | None = None
    timer: str | None = None
    gbps: float | None = None
    # the bandwidth fraction: time of the same-bytes stream (bench/same_bytes.py: the update's
    # fewest bytes in its own passes, interleaved with it) / time of the update; median and
    # p20 / p80 of the per-round ratios
    same_bytes_ms: float | None = None
    same_bytes_gbps: float | None = None
    frac_same_bytes: float | None = None
    frac_same_bytes_p20: float | None = None
    frac_same_bytes_p80: float | None = None
    same_bytes_impl: str | None = None
    peak_extra_bytes: int | None = None
    peak_method: str | None = None
    state_bytes: int | None = None
    ratio_to_plain_backward: float | None = None
    speedups: dict = dataclasses.field(default_factory=dict)
    note: str = ""

    def set_timing(self, t: Timing) -> None:
        self.median_ms, self.p20_ms, self.p80_ms = t.median_ms, t.p20_ms, t.p80_ms
        self.reps, self.timer = t.reps, t.method
        if self.bytes_min is not None and t.median_ms > 0:
            self.gbps = self.bytes_min / (t.median_ms * 1e-3) / 1e9

    def set_same_bytes(self, ref: Timing, fractions: dict, impl: str) -> None:
        """The same-bytes stream's timing (interleaved with this row's) and the fractions."""
        self.same_bytes_ms = ref.median_ms
        if self.bytes_min is not None and ref.median_ms > 0:
            self.same_bytes_gbps = self.bytes_min / (ref.median_ms * 1e-3) / 1e9
        self.frac_same_bytes = fractions["frac_same_bytes"]
        self.frac_same_bytes_p20 = fractions["frac_same_bytes_p20"]
        self.frac_same_bytes_p80 = fractions["frac_same_bytes_p80"]
        self.same_bytes_impl = impl

    def to_dict(self, env: dict) -> dict:
        d = dataclasses.asdict(self)
        speedups = d.pop("speedups")
        return {**env, **d, **speedups}


def add_speedups(rows: list[Row], references: Sequence[str]) -> None:
    """Fill ``row.speedups`` for every row: time of each reference / time of the row, within the
    same (op, dtype, shape). A reference that did not run gives None under its key."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.dtype, r.shape), []).append(r)
    for group in groups.values():
        times = {r.backend: r.median_ms for r in group if r.median_ms}
        for r in group:
            for ref in references:
                key = SPEEDUP_KEYS.get(ref, f"speedup_vs_{ref}")
                t_ref = times.get(ref)
                r.speedups[key] = (t_ref / r.median_ms) if (t_ref and r.median_ms) else None



def row_dicts(rows: Sequence[Row], env: dict) -> list[dict]:
    dicts = [r.to_dict(env) for r in rows]
    keys = []
    for d in dicts:  # every row gets every column (None where it does not apply)
        keys += [k for k in d if k not in keys]
    return [{k: d.get(k) for k in keys} for d in dicts]


def write_json(path: Path, rows: Sequence[Row], env: dict, meta: dict) -> None:
    write_json_payload(path, {"environment": env, "meta": meta, "rows": row_dicts(rows, env)})


def write_csv(path: Path, rows: Sequence[Row], env: dict) -> None:
    dicts = row_dicts(rows, env)
    if not dicts:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dicts[0]))
        w.writeheader()
        for d in dicts:
            w.writerow({k: "" if v is None else v for k, v in d.items()})



def write_json_payload(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def skipped_rows(op, dtype, shape_name, shapes, backends, kinds, note) -> list[Row]:
    return [Row(op=op, backend=b, kind=k, dtype=dtype_name(dtype), shape=shape_name,
                n_tensors=len(shapes), numel=numel_of(shapes),
                bytes_min=fewest_bytes(op, shapes, dtype), note=note)
            for b, k in zip(backends, kinds)]


def merge_rows(old: list[dict], new: list[dict], key) -> list[dict]:
    """``old`` with every row whose ``key(row)`` ``new`` also has replaced by ``new``'s, in
    ``old``'s order, then ``new``'s other rows (a partial re-run of an earlier run)."""
    fresh = {key(r): r for r in new}
    out = [fresh.pop(key(r), r) for r in old]
    return out + [r for r in new if key(r) in fresh]
