"""Run test cases on several gloo ranks spawned on this machine, one process group per job.

``run_job(module, cases, world_size, timeout)`` spawns ``world_size`` processes
(``torch.multiprocessing``, spawn start method). They meet through a ``FileStore`` in a fresh
temporary directory, so no fixed port is used and parallel runs cannot collide; gloo talks over the
loopback interface only (``GLOO_SOCKET_IFNAME=lo``, 127.0.0.1, ports picked by the OS). Every rank
runs every case in order (``"function:arg:arg"``, a function of ``module`` called with a ``Ctx``
and the string arguments), and the ranks agree after each case through the store. A rank that does
not arrive within ``CASE_TIMEOUT`` (a hung collective), a worker that dies, or the job's
``timeout`` stops the job; the cases not run say why.

Returns ``{case: {"ok": bool, "errors": {rank: traceback}, "seconds": float}}`` and the job's
wall time. ``run_jobs`` runs one job per world size at the same time; ``fail_unless_ok`` turns a
case's result into a test failure.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch.multiprocessing as mp

CASE_TIMEOUT = 120.0  # seconds a rank waits for the others at the end of a case


@dataclass
class Ctx:
    rank: int
    world_size: int
    tmpdir: str  # shared by the ranks of the job
    case: str
    before_init: object  # what the module's before_init() returned (run before the group exists)


def _worker(module: str, cases: list, rank: int, world_size: int, tmpdir: str, path: list):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # 127.0.0.1 only
    # Bitwise checks across runs (a resumed run against an uninterrupted one): MKL's AVX-512
    # kernels (QR, GEMM) may round differently with the operands' memory alignment, which
    # differs between two runs; its conditional numerical reproducibility mode does not. Set
    # before this process's first MKL call.
    os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
    sys.path[:0] = [p for p in path if p not in sys.path]
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # several ranks share the cores
    mod = importlib.import_module(module)
    early = mod.before_init(rank, world_size) if hasattr(mod, "before_init") else None
    store = dist.FileStore(os.path.join(tmpdir, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=CASE_TIMEOUT))
    out = open(os.path.join(tmpdir, f"rank{rank}.jsonl"), "a")
    for case in cases:
        fn, *args = case.split(":")
        t0 = time.perf_counter()
        try:
            getattr(mod, fn)(Ctx(rank, world_size, tmpdir, case, early), *args)
            err = None
        except BaseException:  # noqa: BLE001 - reported to the test
            err = traceback.format_exc()
        rec = {"case": case, "rank": rank, "error": err, "seconds": time.perf_counter() - t0}
        out.write(json.dumps(rec) + "\n")
        out.flush()
        store.set(f"done/{case}/{rank}", "1")
        try:
            store.wait([f"done/{case}/{r}" for r in range(world_size)],
                       datetime.timedelta(seconds=CASE_TIMEOUT))
        except Exception:  # noqa: BLE001 - another rank hangs in this case: stop the job
            out.close()
            os._exit(3)
    out.close()
    dist.destroy_process_group()


def run_job(module: str, cases: list, world_size: int, timeout: float):
    tmpdir = tempfile.mkdtemp(prefix="lomo_dist_")
    t0 = time.perf_counter()
    try:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(module, cases, r, world_size, tmpdir, list(sys.path)))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        codes = {r: p.exitcode for r, p in enumerate(procs)}
        return _collect(tmpdir, cases, world_size, hung, codes, timeout), time.perf_counter() - t0
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def run_jobs(module: str, cases: list, world_sizes, timeout: float) -> dict:
    """``{world_size: results}``: one job per world size, all running at the same time."""
    with ThreadPoolExecutor(len(world_sizes)) as pool:
        running = {ws: pool.submit(run_job, module, cases, ws, timeout) for ws in world_sizes}
    return {ws: job.result()[0] for ws, job in running.items()}


def fail_unless_ok(result: dict) -> None:
    """Fail the calling test with every rank's traceback when a case did not pass."""
    if not result["ok"]:
        import pytest

        pytest.fail("\n".join(f"rank {r}:\n{e}" for r, e in result["errors"].items()),
                    pytrace=False)


def _collect(tmpdir, cases, world_size, hung, codes, timeout):
    recs = {}
    for r in range(world_size):
        path = os.path.join(tmpdir, f"rank{r}.jsonl")
        if os.path.exists(path):
            for line in open(path):
                rec = json.loads(line)
                recs[(rec["case"], rec["rank"])] = rec
    results, stopped = {}, None
    for case in cases:
        done = [recs.get((case, r)) for r in range(world_size)]
        if all(done):
            errors = {r: d["error"] for r, d in enumerate(done) if d["error"]}
            results[case] = {"ok": not errors, "errors": errors,
                             "seconds": max(d["seconds"] for d in done)}
            continue
        if stopped is None:
            missing = [r for r, d in enumerate(done) if d is None]
            why = (f"the job ran past its {timeout:.0f} s timeout" if hung else
                   f"worker exit codes {codes}")
            stopped = (f"case {case} did not finish on ranks {missing} ({why}; a rank that "
                       f"finished reported: "
                       + "; ".join(d["error"] or "ok" for d in done if d) + ")")
            results[case] = {"ok": False, "errors": {-1: stopped}, "seconds": float("nan")}
        else:
            results[case] = {"ok": False, "errors": {-1: f"not run: {stopped}"},
                             "seconds": float("nan")}
    return results
