"""bench/gpu_check.sh, the GPU one-shot, as far as a machine without a GPU can run it: its dry run
lists every step and finds every file and the Python driver, and the driver's calls run on the
CPU (the ops' signatures as the GPU steps will use them)."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = ["build", "doctor", "tests", "memcheck", "racecheck", "synccheck", "initcheck",
         "determinism", "benchmarks"]


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_the_dry_run_lists_every_step_and_finds_what_they_need():
    run = _run("--dry-run")
    assert run.returncode == 0, run.stdout + run.stderr
    listed = [line.split()[2] for line in run.stdout.splitlines() if line.startswith("step ")]
    assert listed == STEPS, run.stdout
    for step, tool in (("memcheck", "memcheck"), ("racecheck", "racecheck"),
                       ("synccheck", "synccheck"), ("initcheck", "initcheck")):
        line = next(x for x in run.stdout.splitlines() if f" {step} " in x)
        assert f"--tool {tool}" in line and "bench/gpu_check_ops.py --once" in line, line
    assert "driver ok: bench/gpu_check_ops.py" in run.stdout and "MISSING" not in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs for real")
def test_without_a_gpu_it_says_so_and_exits_0():
    run = _run()
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("gpu_check: no CUDA GPU here"), run.stdout


def _driver(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check_ops.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_driver_calls_every_op_on_the_cpu():
    backends = [b for b in ("native", "cuda_emulated", "torch")
                if __import__("lomo_kernels").available_backends()[b].startswith("loaded")]
    run = _driver("--once", "--device", "cpu", "--small", "--backends", *backends)
    assert run.returncode == 0, run.stdout + run.stderr
    ops = {line.split()[0] for line in run.stdout.splitlines() if line.split()[2:3] == ["ok"]}
    listed = {line.split()[0] for line in _driver("--list").stdout.splitlines()}
    assert ops == listed and len(listed) == 7, (ops, listed)


def test_the_determinism_stress_compares_bits():
    run = _driver("--determinism", "2", "--device", "cpu", "--small", "--backends", "torch")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("2 runs: bitwise identical") == 6 and "determinism: passed" in run.stdout


def test_a_single_bit_is_a_difference():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check_ops

    a = torch.tensor([0.0, float("nan"), 1.0], dtype=torch.bfloat16)
    assert gpu_check_ops.differences({"p": a}, {"p": a.clone()}) == []  # NaN is its bits
    for element, bit in ((0, 15), (1, 0), (2, 0)):  # -0.0, another NaN, 1 + 2**-7
        changed = a.clone()
        changed.view(torch.int16)[element] ^= 1 << bit
        assert gpu_check_ops.differences({"p": a}, {"p": changed}) == ["p: 1 of 3 elements"]
