"""docs/spec.md, "How the sums are accumulated": bench/norm_accuracy.py's float32 norms and
AdaLomo step scales at the size of an LLM's embedding."""

from __future__ import annotations

import re

from bench.docgen.common import CPU, Results


def _sci(x: float) -> str:
    """1.7e-3, not 1.7e-03."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.1e}").replace("e+", "e")


def sum_accuracy(res: Results) -> str:
    data = res(f"{CPU}/norm_accuracy.json")
    norm, scale, env = data["vector_norm_relative_error"], data["step_scale"], data["environment"]
    m, n = data["shape"]
    side = "below" if norm["embedding"] < 0 else "above"
    backends = {"torch": "the reference", "native": "the native CPU kernels"}
    ours = " and ".join(f"{_sci(abs(1 - scale[b]))} ({w})" for b, w in backends.items()
                        if b in scale)
    why = ("the update's RMS is above `clip_threshold`, so its float32 RMS scales the step too"
           if data["update_clipped"] else
           f"the update's RMS, {data['rms_u']:.2f}, is below `clip_threshold`, so `rms(p)` alone "
           "sets the step size")
    threads = env["cpu_threads"]
    return (f"`torch.linalg.vector_norm` in float32 on CPU is {_sci(abs(norm['embedding']))} "
            f"(relative) {side} float64's over an LLM's embedding (SmolLM2-135M's {m} x {n}, "
            f"{m * n / 1e6:.1f}M elements; {_sci(abs(norm['randn']))} on a random normal tensor "
            f"of that shape), so `lomo-optim` under-steps that parameter by "
            f"{100 * (1 - scale['lomo_optim']):.2f}% (measured on the first step, with the "
            f"gradient of {data['tokens']} tokens of text: {why}; step scale "
            f"`<d, d64> / <d64, d64>` against the float64 evaluation "
            f"{scale['lomo_optim']:.5f}); the backends here are within {ours} of the update's "
            f"scale (`python bench/norm_accuracy.py`, torch {env['torch_version']}, {threads} "
            f"thread{'s' if threads != 1 else ''})")
