"""bench/bench_memory.py on a tiny CPU config: every case runs and reports, the allocator's view
orders the cases as the memory story says, a case over its limit is a result, not a crash."""

import json

import pytest

pytest.importorskip("transformers")

from bench import bench_memory as bm  # noqa: E402



def test_every_case_on_a_tiny_model(tmp_path, capsys):
    # width 384: the matrices exceed Lomo's small-parameter batching bound (65536 elements), so
    # that the in-backward cases hold one gradient at a time as on a real model
    res = bm.main(["--device", "cpu", "--seq-len", "32", "--isolation", "inprocess",
                   "--hidden-size", "384",
                   "--memory-cap-gb", "0.5", "--search-widths", "64", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert max(len(line) for line in printed.splitlines()) <= 100
    data = json.loads((tmp_path / "memory.json").read_text())
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"
    assert data["rows"] == json.loads(json.dumps(res["rows"], default=str))
    for key in ("device", "torch_version", "git_commit", "date", "load_avg_1_5_15min",
                "transformers_version", "lomo_optim_version"):
        assert key in data["environment"]
    by = {r["optimizer"]: r for r in data["rows"]}
    assert list(by) == list(bm.DEFAULT_CASES)
    for name, r in by.items():
        assert r["status"] == "ok", r
        assert r["peak_bytes"] > 0 and r["estimate_bytes"] > 0
        assert r["alloc_peak_bytes"] >= r["param_bytes"] > 0
        if name != "floor-params":
            assert r["finite"] and r["step_s"] > 0 and r["tokens_per_s"] > 0
    P = by["floor-params"]["param_bytes"]
    # the allocator's peaks (exact, even in one process) follow the memory story
    assert by["floor-backward"]["alloc_peak_bytes"] >= 2 * P
    for ours in ("lk-adalomo", "lk-lomo"):
        assert by[ours]["alloc_peak_bytes"] < by["floor-backward"]["alloc_peak_bytes"]
        assert by[ours]["alloc_peak_bytes"] < by["lomo_optim-" + ours[3:]]["alloc_peak_bytes"]
    assert by["adamw"]["alloc_peak_bytes"] >= 4 * P  # parameters, gradients, two moments
    # state: AdamW two moments per parameter; AdaLomo factored float32 rows and columns
    assert by["adamw"]["state_bytes"] >= 2 * P
    assert 0 < by["lk-adalomo"]["state_bytes"] < by["adamw"]["state_bytes"] / 4
    assert by["lk-adalomo"]["state_bytes"] == by["lomo_optim-adalomo"]["state_bytes"]
    assert by["lk-lomo"]["state_bytes"] == 0
    search = data["search"]
    assert search["widths"][0]["width"] == 64 and search["largest"]["depth"] >= 2


def test_a_case_over_its_limit_does_not_fit():
    """In its own process under a 64 MiB address-space limit, a model needing more reports
    "does not fit in 64 MiB" instead of crashing."""
    case = dict(device="cpu", dtype="bf16", seq_len=16, batch_size=1, steps=1,
                gradient_checkpointing=True, lr=1e-3, backend="auto", optimizer="lk-adalomo",
                allocator_trace=False, limit_bytes=64 * 2**20,
                shape=bm.family_shape(1024, 8, None))
    row = bm.run_case_isolated(case, timeout=300)
    assert row["status"] == "does not fit", row
    assert row["note"] == "does not fit in 64 MiB"


def test_merge_replaces_remeasured_rows():
    old = [{"model_config": "1b", "optimizer": "a", "v": 1},
           {"model_config": "3b", "optimizer": "a", "v": 2}]
    new = [{"model_config": "3b", "optimizer": "a", "v": 3},
           {"model_config": "3b", "optimizer": "b", "v": 4}]
    assert [r["v"] for r in bm.merge_rows(old, new)] == [1, 3, 4]


@pytest.mark.parametrize("script", ["bench_memory", "bench_convergence", "run"])
def test_help_names_no_internal_documents(script, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"bench.{script}").parse_args(["--help"])
    out = capsys.readouterr().out
    assert "usage" in out
    assert "SPEC.md" not in out and "DESIGN.md" not in out and "issue" not in out.lower()


def test_merge_keeps_each_sequence_length_and_loss_chunking():
    old = [{"model_config": "8b", "seq_len": 256, "optimizer": "a", "v": 1},
           {"model_config": "8b", "seq_len": 2048, "optimizer": "a", "v": 2}]
    new = [{"model_config": "8b", "seq_len": 2048, "optimizer": "a", "v": 3},
           {"model_config": "8b", "seq_len": 2048, "optimizer": "a", "loss_chunk": 256, "v": 4}]
    assert [r["v"] for r in bm.merge_rows(old, new)] == [1, 3, 4]


def test_merge_keeps_each_mmap_threshold():
    old = [{"model_config": "8b", "seq_len": 2048, "optimizer": "a", "loss_chunk": 256, "v": 1}]
    new = [{"model_config": "8b", "seq_len": 2048, "optimizer": "a", "loss_chunk": 256,
            "mmap_threshold_mib": 1.0, "v": 2}]
    assert [r["v"] for r in bm.merge_rows(old, new)] == [1, 2]


def test_a_case_runs_under_its_mmap_threshold(monkeypatch):
    """--mmap-threshold-mib: the case runs inside memprobe.exact_rss with that many bytes (glibc
    maps each such block on its own and unmaps it when freed), left again when the case ends,
    and the row and its label say so."""
    import contextlib

    from bench import memprobe, summary

    calls = []

    @contextlib.contextmanager
    def recording(threshold):
        calls.append(("enter", threshold))
        yield True
        calls.append(("exit", threshold))

    monkeypatch.setattr(memprobe, "exact_rss", recording)
    case = dict(device="cpu", dtype="bf16", seq_len=8, batch_size=1, steps=0,
                gradient_checkpointing=False, lr=1e-3, backend="auto", optimizer="lk-lomo",
                allocator_trace=False, mmap_threshold_mib=1.5,
                shape=bm.family_shape(64, 1, None))
    row = bm.run_case(case)
    assert row["status"] == "ok", row
    assert calls == [("enter", 3 * 2**19), ("exit", 3 * 2**19)]
    row.update(mmap_threshold_mib=1.5, loss_chunk=4)
    assert summary.memory_case(row) == "lk-lomo (loss/4, mmap 1.5 MiB)"
    calls.clear()
    assert bm.run_case({**case, "mmap_threshold_mib": None})["status"] == "ok"
    assert calls == []
