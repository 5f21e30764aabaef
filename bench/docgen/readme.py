"""README.md: the opening claims and the results summary, from four results files."""

from __future__ import annotations

from bench import summary
from bench.docgen.common import CPU, GIB, Results


def _memory_peaks(res: Results) -> dict:
    """The 1B shape's peaks (the file also holds other shapes' rows; rows without a sequence
    length were measured at 256)."""
    return {r["optimizer"]: r["peak_bytes"] / GIB for r in res(f"{CPU}/memory.json")["rows"]
            if r["status"] == "ok" and r.get("model_config") == "1b"
            and r.get("seq_len", 256) == 256 and not r.get("loss_chunk")}


def _memory_date(res: Results) -> str:
    """The date of the 1B rows the summary reads (memory.json's own date is its last merge)."""
    dates = {r["date"][:10] for r in res(f"{CPU}/memory.json")["rows"]
             if r["status"] == "ok" and r.get("model_config") == "1b" and r["optimizer"] in
             ("lk-adalomo", "lk-lomo", "lomo_optim-adalomo", "adamw")}
    return ", ".join(sorted(dates))


def _convergence(res: Results) -> dict:
    runs = res(f"{CPU}/convergence.json")["runs"]
    return {r["optimizer"]: r for r in runs if "error" not in r}


def _microbench(res: Results) -> dict:
    rows = res(f"{CPU}/results.json")["rows"]
    return {(r["op"], r["backend"]): r for r in rows}


def _others(rows: dict) -> list[str]:
    """What lomo-optim's AdaLomo and AdamW did in ``rows`` ({case: memory.json row})."""
    out = []
    for name, label in (("lomo_optim-adalomo", "lomo-optim's AdaLomo"), ("adamw", "AdamW")):
        r = rows.get(name)
        if r is None:
            continue
        if r["status"] == "ok":
            out.append(f"{label} peaks at {r['peak_bytes'] / GIB:.2f} GiB")
        elif r["status"] == "does not fit":
            out.append(f"{label} runs out of memory under a {r['limit_bytes'] / GIB:.1f} GiB limit")
    return out


def _llama3_8b(res: Results) -> list[str]:
    """The Llama-3-8B claim, once AdaLomo's step of that shape has run (none before): its peak,
    what lomo-optim's AdaLomo and AdamW did in the same machine, and AdaLomo's lowest peak at a
    longer sequence, where one fitted."""
    data = res(f"{CPU}/memory.json")
    rows = {r["optimizer"]: r for r in data["rows"]
            if r.get("model_config") == "llama3-8b" and r.get("seq_len", 256) == 256
            and not r.get("loss_chunk") and not r.get("mmap_threshold_mib")}
    ok = {k: r for k, r in rows.items() if r["status"] == "ok"}
    if "lk-adalomo" not in ok or "floor-params" not in ok:
        return []
    others = _others(rows)
    longer = [r for r in data["rows"] if r.get("model_config") == "llama3-8b"
              and r["optimizer"] == "lk-adalomo" and r.get("seq_len", 256) > 256
              and r["status"] == "ok"]
    tail = ""
    if longer:
        r = min(longer, key=lambda r: r["peak_bytes"])
        chunk = (f", the loss computed {r['loss_chunk']} positions at a time"
                 if r.get("loss_chunk") else "")
        if r.get("mmap_threshold_mib"):
            chunk += (f" and glibc unmapping every freed block of {r['mmap_threshold_mib']:g} "
                      f"MiB or more")
        same = {x["optimizer"]: x for x in data["rows"] if x.get("model_config") == "llama3-8b"
                and x.get("seq_len") == r["seq_len"] and x.get("loss_chunk") == r.get("loss_chunk")
                and x.get("mmap_threshold_mib") == r.get("mmap_threshold_mib")}
        there = _others(same)
        tail = (f" At sequence {r['seq_len']}{chunk}, AdaLomo peaks at "
                f"{r['peak_bytes'] / GIB:.2f} GiB" + (f"; {' and '.join(there)}" if there else "")
                + ".")
    total = data["environment"]["memory_total_gib"]
    return [f"* **8B on a 24 GiB machine**: one AdaLomo training step of the Llama-3-8B shape "
            f"(bf16, checkpointing, sequence 256; this CPU's linear layers computed in float32 "
            f"tiles, [docs/evidence.md](docs/evidence.md)) peaks at "
            f"{ok['lk-adalomo']['peak_bytes'] / GIB:.2f} GiB above the process's start on a "
            f"{total:.1f} GiB CPU machine; its parameters alone are "
            f"{ok['floor-params']['peak_bytes'] / GIB:.2f} GiB"
            + (f"; {' and '.join(others)}" if others else "") + "." + tail]


def headline(res: Results) -> str:
    """The README's opening claims, one bullet each, with where they were measured."""
    peak, conv, micro = _memory_peaks(res), _convergence(res), _microbench(res)
    ex = res(f"{CPU}/finetune_example.json")
    mem_cfg = res(f"{CPU}/memory.json")["args"]
    ada, adamw = conv["lk-adalomo"], conv["adamw"]
    gap = 100 * (ada["final_eval_loss"] / adamw["final_eval_loss"] - 1)
    share = 100 * ada["state_bytes"] / adamw["state_bytes"]
    lomo_x = micro[("lomo_update", "native")]["speedup_vs_lomo_optim"]
    ada_x = micro[("adalomo_update", "native")]["speedup_vs_lomo_optim"]
    return "\n".join([
        f"* **Memory**: one training step of a Llama-3.2-1B-shaped model ({mem_cfg['dtype']}, "
        f"checkpointing) peaks at {peak['lk-adalomo']:.2f} GiB with AdaLomo, "
        f"{peak['lomo_optim-adalomo']:.2f} GiB with lomo-optim's AdaLomo and "
        f"{peak['adamw']:.2f} GiB with AdamW ({peak['adamw'] / peak['lk-adalomo']:.1f}x); "
        f"the parameters alone are {peak['floor-params']:.2f} GiB.",
        *_llama3_8b(res),
        f"* **Quality**: on a short pre-training run AdaLomo ends {abs(gap):.1f}% "
        f"{'below' if gap < 0 else 'above'} AdamW's held-out loss with {share:.1f}% of its "
        f"optimizer state.",
        f"* **Speed**: one bf16 update of a 4096 x 4096 parameter on 2 CPU cores is "
        f"{lomo_x:.0f}x (LOMO) and {ada_x:.0f}x (AdaLomo) faster than lomo-optim's.",
        f"* **End to end**: SmolLM2-135M-Instruct learns a date-formatting task offline on a "
        f"CPU, exact match {100 * ex['exact_match_before']:.0f}% -> "
        f"{100 * ex['exact_match_after']:.0f}% on {ex['exact_match_n']} held-out dates in "
        f"{ex['steps']} steps.",
        "",
        "All measured on a shared 2-core AMD EPYC CPU; machine, load, commands and commits in "
        "[docs/results.md](docs/results.md). No GPU has measured these kernels yet.",
    ])


def summary_table(res: Results) -> str:
    """README's results summary: one line per question, the numbers from four results files."""
    peak, conv, micro = _memory_peaks(res), _convergence(res), _microbench(res)
    step = {(r["shape"], r["op"], r["backend"]): r["ratio_to_plain_backward"]
            for r in res(f"{CPU}/results-backward.json")["rows"]}

    def when(name: str) -> str:  # the results file's date: the 2-core hosts have not all been one CPU
        env = res(f"{CPU}/{name}")["environment"]
        env = env[0] if isinstance(env, list) else env
        return f"`{name}`, {env['date'][:10]}"

    base = conv["adamw"]["final_eval_loss"]
    rows = [
        ["peak memory, one step, Llama-3.2-1B shape (GiB)",
         f"{peak['lk-adalomo']:.2f} (AdaLomo), {peak['lk-lomo']:.2f} (Lomo)",
         f"{peak['lomo_optim-adalomo']:.2f} (lomo-optim AdaLomo), {peak['adamw']:.2f} (AdamW)",
         f"`memory.json`, {_memory_date(res)}"],
        ["held-out loss vs AdamW, 18M Llama, 120 steps",
         f"{100 * (conv['lk-adalomo']['final_eval_loss'] / base - 1):+.1f}% (AdaLomo), "
         f"{100 * (conv['lk-galore']['final_eval_loss'] / base - 1):+.1f}% (GaLore)",
         f"{100 * (conv['lomo_optim-adalomo']['final_eval_loss'] / base - 1):+.1f}% "
         "(lomo-optim AdaLomo)", when("convergence.json")],
        ["one 4096 x 4096 bf16 update (ms)",
         f"{micro[('lomo_update', 'native')]['median_ms']:.2f} (LOMO), "
         f"{micro[('adalomo_update', 'native')]['median_ms']:.2f} (AdaLomo)",
         f"{micro[('lomo_update', 'lomo_optim')]['median_ms']:.1f}, "
         f"{micro[('adalomo_update', 'lomo_optim')]['median_ms']:.1f} (lomo-optim)",
         when("results.json")],
        ["forward + backward with AdaLomo, vs a plain one (125M model)",
         f"{step[('bwd-medium', 'backward_adalomo', 'native')]:.2f}x",
         f"{step[('bwd-medium', 'backward_adalomo', 'lomo_optim')]:.2f}x (lomo-optim)",
         when("results-backward.json")],
    ]
    return summary.markdown(["measured (2-core CPU)", "lomo_kernels", "compared with",
                             "results file (bench/results/cpu/), date"], rows)


def build_time(res: Results) -> str:
    """README's install time: each variant of bench/build_time.py, with its load and commit."""
    d = res(f"{CPU}/build_time.json")
    env = d["environment"]
    parts = [f"{r['wall_s'] / 60:.0f} min for "
             + ("the CPU kernels alone" if r["variant"] == "cpu"
                else "everything (CPU, CUDA for sm_80/sm_90 and the emulation)")
             + f" (load {r['load_avg_before'][0]:.1f})" for r in d["rows"]]
    return (" and ".join(parts) + f" with `MAX_JOBS={d['rows'][0]['max_jobs']}` on "
            f"{summary._machine(env).split(', load average')[0]} (`bench/build_time.py`)")


def test_time(res: Results) -> str:
    """README's test command: the default run's time from bench/test_time.py."""
    rows = [r for r in res(f"{CPU}/test_time.json")["rows"]
            if r["command"] == "python -m pytest -q -rs tests"]
    r = rows[-1]
    env = r["environment"]
    wall = f"{r['wall_s'] // 60:.0f} min {r['wall_s'] % 60:.0f} s"
    return (f"{wall} ({r['counts'].get('passed', 0)} passed; {r['cpu_s'] / 60:.1f} min of CPU) on "
            f"{summary._machine(env).split(', load average')[0]}, load "
            f"{r['load_avg_before'][0]:.1f} at the start and {r['load_avg_after'][0]:.1f} at the end "
            "(`python bench/test_time.py`)")
