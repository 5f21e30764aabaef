"""docs/results.md: one table per results file (and the fine-tuning example, also quoted by
docs/finetune.md)."""

from __future__ import annotations

from bench import summary
from bench.docgen.common import CPU, GIB, MIB, Results, command, source as _source


def memory_table(res: Results) -> str:
    return summary.memory(res.path(f"{CPU}/memory.json"))


def convergence_table(res: Results) -> str:
    return summary.convergence(res.path(f"{CPU}/convergence.json"))


def step_time_table(res: Results) -> str:
    return summary.step_time(res.path(f"{CPU}/results-backward.json"))


def whole_step_table(res: Results) -> str:
    """The whole step on the real model (bench_backward.py --whole-step): each optimizer's step as
    a ratio to a plain forward + backward timed in the same rounds; with --profile, the time over
    the plain step beside the time inside the update ops."""
    data = res(f"{CPU}/whole_step.json")
    env, meta = data["environment"], data["meta"]
    profiled = all(r.get("profile") for r in data["rows"])
    rows = [[r["model"], r["dtype"], r["threads"],
             (f"`{r['optimizer']}`, {r['entry']}" if r["op"] != "backward_plain"
              else "plain forward + backward"),
             f"{r['median_ms']:.0f}", f"{r['ratio_to_plain_backward']:.3f}x",
             f"{r['ratio_to_plain_backward_p20']:.2f}-{r['ratio_to_plain_backward_p80']:.2f}",
             r["rounds"]]
            + ([f"{r['overhead_ms']:.0f}", f"{r['profile']['update_ops_ms']:.0f}",
                r["profile"]["update_ops_calls"]] if profiled else [])
            for r in data["rows"]]
    loads = meta["load_avg_1_5_15min_start"][0], meta["load_avg_1_5_15min_end"][0]
    extra = ["ms over plain", "ms in update ops", "update calls"] if profiled else []
    note = ("\n\nms over plain: the median per-round difference to the plain step; ms in update "
            "ops: the time inside this library's update ops (`lomo_kernels::*`) in one step, "
            f"the median of {data['rows'][0]['profile']['steps']} steps under torch's profiler "
            "(`--profile`); update calls: those ops' calls per step." if profiled else "")
    return (_source(env, command("bench/bench_backward.py", meta["argv"]),
                    f"{loads[0]} at the start, {loads[1]} at the end") + "\n\n"
            + summary.markdown(["model", "dtype", "threads", "optimizer, entry", "median ms",
                                "vs plain", "p20-p80", "rounds"] + extra, rows) + note)


def whole_step_profile(res: Results) -> str:
    """Where a fused step's time over the plain step goes (--profile): the time inside the update
    ops, and the rate at which they move their fewest bytes (the row's ``fewest_bytes``; rows
    measured before it was recorded: LOMO 3e, AdaLomo 6e bytes per element, docs/spec.md's count
    for the matrices, which hold nearly all the parameters)."""
    data = res(f"{CPU}/whole_step.json")
    rows = [r for r in data["rows"] if r.get("profile") and r["entry"] == "fused_backward"]
    if not rows:
        return "Not profiled (`bench/bench_backward.py --whole-step ... --profile STEPS`)."
    parts = []
    for r in rows:
        es = 4 if r["dtype"] == "fp32" else 2
        moved = r.get("fewest_bytes") or r["n_params"] * es * (3 if r["optimizer"] == "lomo" else 6)
        ms = r["profile"]["update_ops_ms"]
        parts.append(f"`{r['optimizer']}` at {r['threads']} thread{'s' if r['threads'] > 1 else ''}"
                     f" {r['overhead_ms']:.0f} ms over the plain step, {ms:.0f} ms inside its "
                     f"{r['profile']['update_ops_calls']} update calls ({moved / 1e9:.2f} GB at "
                     f"{moved / ms / 1e6:.0f} GB/s)")
    return "Per step, " + "; ".join(parts) + "."


def clip_modes_table(res: Results) -> str:
    data = res(f"{CPU}/clip_modes.json")
    env = data["environment"]
    table = [[r["optimizer"], r["mode"], f"{r['median_ms']:.1f}",
              f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}",
              f"{r['ratio_to_unclipped']:.2f}x" if r["ratio_to_unclipped"] else "-",
              f"{r['ratio_to_plain_backward']:.2f}x"] for r in data["rows"]]
    cmd = (f"python bench/bench_clip_modes.py --device {env['device']} --model {env['model']} "
           f"--dtype {env['dtype']} --clip-grad-norm {env['clip_grad_norm']} "
           f"--threads {env['cpu_threads']}"
           + (f" --rep-ms {env['rep_ms']:g}" if "rep_ms" in env else ""))
    threads = f"{env['cpu_threads']} thread{'s' if env['cpu_threads'] != 1 else ''}"
    head = (f"Clipping modes ({env['model']}, {env['dtype']}, batch {env['batch']} x seq "
            f"{env['seq']}, {threads}; `acc4`: the median of its 4-micro-batch step, the ratios "
            "per micro-batch): ")
    return (head + _source(env, cmd, f"{env['load_avg_before'][0]} before, "
                           f"{env['load_avg_after'][0]} after") + "\n\n"
            + summary.markdown(["optimizer", "clipping", "median ms", "p20-p80 ms",
                                "vs unclipped", "vs plain backward"], table))


_LABELS = {"native": "lomo_kernels native", "torch": "lomo_kernels torch (reference)",
           "lomo_optim": "lomo-optim's per-tensor math", "sgd_fused": "`SGD(fused=True)`",
           "adafactor_foreach": "`Adafactor` (foreach)", "adafactor_single": "`Adafactor`"}


def microbench_table(res: Results) -> str:
    data = res(f"{CPU}/results.json")
    env, meta = data["environment"], data["meta"]
    rows = sorted(data["rows"], key=lambda r: (r["op"] != "lomo_update", r["median_ms"]))
    table = [[r["op"], _LABELS.get(r["backend"], r["backend"]), f"{r['median_ms']:.2f}",
              f"{r['gbps']:.1f}", f"{r['frac_same_bytes']:.2f}",
              f"{r['speedup_vs_lomo_optim']:.1f}x"] for r in rows]
    shape = f"{rows[0]['shape']} {rows[0]['dtype']}" if rows else ""
    return (f"One update of a {shape} parameter, {env['cpu_threads']} threads: "
            + _source(env, "python bench/run.py " + " ".join(meta["argv"])) + "\n\n"
            + summary.markdown(["op", "implementation", "median ms", "GB/s",
                                "of the same-bytes stream", "vs lomo-optim"], table))


_NAMES = {"adalomo": "AdaLomo", "lomo": "Lomo", "golore": "GoLore", "galore": "GaLore",
          "adamw": "AdamW"}


def finetune_example(res: Results) -> str:
    d = res(f"{CPU}/finetune_example.json")
    env = d["environment"]
    return (f"Exact match on the {d['exact_match_n']} held-out dates: "
            f"**{100 * d['exact_match_before']:.0f}% before -> {100 * d['exact_match_after']:.0f}% "
            f"after** {d['steps']} {_NAMES.get(d['optimizer'], d['optimizer'])} steps "
            f"(batch {d['batch_size']}; held-out loss "
            f"{d['eval_loss_start']:.2f} -> {d['eval_loss_end']:.4f}); {d['n_params'] / 1e6:.0f}M "
            f"parameters, peak memory {d['peak_memory_bytes'] / GIB:.1f} GiB (RSS), optimizer "
            f"state {d['optimizer_state_bytes'] / MIB:.1f} MiB; {d['train_s']:.0f} s of training "
            f"({d['step_s']:.0f} s per step, {d['tokens_per_s']:.0f} tokens/s, "
            f"{d['torch_threads']} torch thread), {d['wall_s']:.0f} s in all, plus "
            f"{d['conversion_s']:.0f} s converting the GGUF file once. "
            + _source(env, d["command"], f"{d['load_avg_start'][0]} at the start, "
                      f"{d['load_avg_end'][0]} at the end"))
