"""The SIMT emulation that runs csrc/cuda/*.cu on CPU tensors (backend ``cuda_emulated``).

Its own semantics, through probe kernels written in CUDA (csrc/emulated/probes.cpp), each checked
against an independent Python computation: warp shuffles, votes and reductions exchange values
between lanes; barriers count; 3-D indices; per-block dynamic shared memory; integer atomics and a
last-block-done ticket across blocks running concurrently on several OS threads; block orders.
Then what it must reject (a GPU would hang, fault or compute garbage): deadlocks, exited lanes in
a warp mask, mismatched warp collectives, misaligned or out-of-bounds 16-byte accesses, shared
memory out of bounds, shared-memory races (a missing barrier among them), a read of uninitialised
shared memory, a block larger than the kernel's __launch_bounds__, and (the memory model) a missing
fence before a ticket or after it, a finisher's plain load. And what the kernels of this package cost in
launches.
"""

import pytest
import torch
from conftest import requires_cuda_emulation
from oracle import adalomo_state, rand

from lomo_kernels import ops

pytestmark = requires_cuda_emulation

OPS = getattr(torch.ops, ops.EMULATED_NAMESPACE)


def _probe(name, out=None, arg=0, arg2=0):
    ops._native._emulation_probe(name, torch.zeros(1) if out is None else out, arg, arg2)
    return out


@pytest.fixture(params=["1", "2"], ids=["1-os-thread", "2-os-threads"])
def os_threads(request, monkeypatch):
    monkeypatch.setenv("LOMO_KERNELS_EMULATION_THREADS", request.param)
    return int(request.param)


@pytest.mark.parametrize("width", [32, 16, 8, 4])
def test_warp_shuffles_votes_and_reductions(width, os_threads):
    blocks = 3
    out = _probe("shuffle", torch.zeros(blocks, 64, 10, dtype=torch.int32), blocks, width)
    for b in range(blocks):
        for t in range(64):
            v = 1000 * b + t
            lane, warp0 = t % 32, t - t % 32
            seg = lane - lane % width

            def val(src_lane):
                return 1000 * b + warp0 + src_lane

            x = lane ^ 5
            want = [
                val(x) if x < seg + width else v,  # xor into a later segment: own value
                val(lane + 3) if lane + 3 < seg + width else v,
                val(lane - 3) if lane - 3 >= seg else v,
                val(seg + 7 % width),
                val(seg + (width - 1)),  # srcLane -1 is taken modulo width
                sum(1 << i for i in range(32) if val(i) % 3 == 0),
                int(any(val(i) % 29 == 0 for i in range(32))),
                1,
                sum(val(i) for i in range(32)),
                val(lane ^ 1) + (max(val(i) for i in range(16)) if lane < 16 else -1),
            ]
            got = out[b, t].tolist()
            want[5] = want[5] - (1 << 32) if want[5] >= 1 << 31 else want[5]
            assert got == want, (b, t, got, want)


def test_barriers_3d_indices_and_dynamic_shared_memory(os_threads):
    out = _probe("block", torch.zeros(12, 64, 4, dtype=torch.int32))
    nt = 8 * 4 * 2
    for b in range(12):
        for t in range(nt):
            x, y, z = t % 8, t // 8 % 4, t // 32
            reversed_ = 7 * b + (nt - 1 - t)  # written by another thread before the barrier
            count = sum(1 for i in range(nt) if i % 5 == 0)
            assert out[b, t].tolist() == [reversed_, count, 1 + 2 * (b % 2 == 0),
                                          x + 100 * y + 10000 * z], (b, t)


def test_atomics_and_last_block_ticket_across_concurrent_blocks(os_threads):
    blocks = 257
    for _ in range(3):  # repeated: the OS threads interleave differently every time
        out = torch.zeros(64 + 8 * blocks, dtype=torch.uint8)
        _probe("atomic", out, blocks)
        fields = out[:48].view(torch.int32)
        n = blocks * 128
        add, inc, cas, mx = (fields[0].item(), fields[1].item(), fields[4].item(),
                             fields[5].item())
        big = out[8:16].view(torch.int64).item()
        last, total = fields[6].item(), out[32:40].view(torch.int64).item()
        assert add == n and cas == n and big == n * 2**33
        assert inc == n % 100  # atomicInc(limit 99) wraps to 0 after 99
        assert mx == (blocks - 1) * 1000 + 127
        assert total == n * (n - 1) // 2  # every block's partial, summed by the last one
        assert 0 <= last < blocks
        assert out[48:52].view(torch.int32).item() == blocks  # every block took a ticket


def test_a_missing_barrier_is_a_race_and_without_the_check_gives_wrong_results(monkeypatch):
    # The race check names the array, the index and both threads. Without it, the schedule
    # variants (warp order and lane order per block) make a shared-memory read that lacks its
    # barrier see stale values in some block, instead of passing by luck.
    blocks = 4
    with pytest.raises(RuntimeError, match=r"missing_barrier_probe .*shared-memory race on "
                                           r"'s'\[\d+\].* thread \(\d+,0,0\) (wrote|read) it"):
        _probe("missing_barrier", torch.zeros(blocks, 256, dtype=torch.int32), blocks)
    monkeypatch.setenv("LOMO_KERNELS_EMULATION_SHARED_CHECKS", "0")
    out = _probe("missing_barrier", torch.zeros(blocks, 256, dtype=torch.int32), blocks)
    want = torch.tensor([[b + (t + 37) % 256 + 1 for t in range(256)] for b in range(blocks)],
                        dtype=torch.int32)
    assert not torch.equal(out, want)


@pytest.mark.parametrize("variant,index,message", [
    (0, 32, r"store of 4 bytes at 's'\[32\] is past the end of 's' \(128 bytes"),
    (1, -1, r"load of 4 bytes at 's'\[-1\] is before the start of 's'"),
    (2, 64, r"store of 4 bytes at the dynamic shared memory, byte 256 is past the end of the "
            r"dynamic shared memory \(256 bytes"),
], ids=["static-write-past-end", "static-read-before-start", "dynamic-write-past-end"])
def test_shared_memory_out_of_bounds_is_an_error(variant, index, message):
    # On a GPU these read or overwrite a neighbouring array (or another block's memory) silently.
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"shared_bounds_probe .*block \(0,0,0\) thread "
                                           r"\(0,0,0\): shared-memory " + message):
        _probe("shared_bounds", out, variant, index)
    _probe("shared_bounds", out, 3, 0)  # no bug: every access inside its array
    assert out.tolist() == [t % 32 + t for t in range(64)]


@pytest.mark.parametrize("variant,racy", [
    (0, False), (1, True), (2, True), (3, True), (4, False), (5, True), (6, False), (7, True),
], ids=["barrier", "read-after-write", "write-after-read", "write-after-write", "syncwarp",
        "warp-without-syncwarp", "atomics", "plain-read-next-to-atomics"])
def test_shared_memory_races_are_errors(variant, racy, os_threads):
    # Two threads of a block on one address between two barriers, one of them writing (atomics
    # against atomics excepted), unless a __syncwarp of both lanes orders them.
    out = torch.zeros(2, 64, dtype=torch.int32)
    if racy:
        with pytest.raises(RuntimeError, match=r"shared_race_probe .*thread \(\d+,0,0\): "
                                               r"shared-memory race on '(s|counter)'\[\d+\]: this "
                                               r"thread (reads|writes|atomically updates) it, and "
                                               r"thread \(\d+,0,0\) (wrote|read) it"):
            _probe("shared_race", out, variant)
        return
    _probe("shared_race", out, variant)
    want = {0: [(t + 1) % 64 for t in range(64)], 4: [t ^ 1 for t in range(64)], 6: [64] * 64}
    assert out.tolist() == [want[variant]] * 2


def test_launch_bounds_refuse_a_larger_block():
    # bounded_probe is declared __launch_bounds__(64): a GPU refuses a launch of 65 threads or more
    out = torch.zeros(2 * 128, dtype=torch.int32)
    _probe("launch_bounds", out, 64)
    assert out[:128].tolist() == [1] * 128
    with pytest.raises(RuntimeError, match=r"bounded_probe .*a block of 96 threads launched for a "
                                           r"kernel declared __launch_bounds__\(64\)"):
        _probe("launch_bounds", out, 96)


@pytest.mark.parametrize("variant", [0, 1, 2, 3],
                         ids=["right", "no-fence", "plain-load", "no-acquire-fence"])
@pytest.mark.parametrize("model", ["1", "0"], ids=["model", "no-model"])
def test_memory_model_exposes_a_missing_fence_and_a_plain_load(variant, model, monkeypatch):
    # A last-block-done sum: each block stores its partial, fences, takes a ticket; the last one
    # fences and reads the partials with __ldcg. Under the memory model a partial stored without
    # the fence is unpublished (the finisher reads poison), a plain load reads a stale (poisoned)
    # L1 copy, and without its own fence the finisher has acquired nothing. Without the model the
    # bugs pass, as they would on a GPU most of the time.
    monkeypatch.setenv("LOMO_KERNELS_EMULATION_MEMORY_MODEL", model)
    blocks = 37
    for _ in range(2):  # the block order differs between launches
        out = _probe("ticket", torch.zeros(blocks + 2), blocks, variant)
        right = out[-1].item() == blocks * (blocks + 1) // 2
        assert right == (variant == 0 or model == "0"), (variant, model, out[-1].item())
        assert out[:blocks].tolist() == [b + 1.0 for b in range(blocks)]  # published at the end
        assert out[blocks:blocks + 1].view(torch.int32).item() == 0  # the ticket is reset


def test_blocks_start_in_reversed_and_shuffled_orders(monkeypatch):
    # one host thread: with two, blocks start two at a time and the recorded order interleaves
    monkeypatch.setenv("LOMO_KERNELS_EMULATION_THREADS", "1")
    blocks = 50
    orders = []
    for _ in range(4):
        out = _probe("order", torch.zeros(blocks + 1, dtype=torch.int32), blocks)
        assert sorted(out[:blocks].tolist()) == list(range(blocks))
        orders.append(out[:blocks].tolist())
    assert list(range(blocks - 1, -1, -1)) in orders
    assert any(o not in (list(range(blocks)), list(range(blocks - 1, -1, -1))) for o in orders)


@pytest.mark.parametrize("name,message", [
    ("deadlock", "deadlock"),
    ("exited_lane", "exited"),
    ("mixed_collectives", "different warp collectives"),
    ("misaligned", "misaligned 16-byte vector load"),
    ("bad_block", "invalid block"),
])
def test_what_a_gpu_would_not_run_is_an_error(name, message):
    with pytest.raises(RuntimeError, match=message):
        _probe(name, torch.zeros(64))


@pytest.mark.parametrize("blocks", [1, 5])
def test_uninitialised_static_shared_memory_is_an_error_or_reads_the_poison(blocks, monkeypatch):
    # A kernel that never zeroes its shared counter: on a GPU it starts from whatever the SM's
    # shared memory held. The initialisation check names the array and the thread that read it.
    # Without it, the count starts from the poison (-1) in every block, also in the first block an
    # OS thread runs (fresh memory would be zero and the count right by luck) and in the blocks
    # after it (the previous block's count would pile up).
    monkeypatch.setenv("LOMO_KERNELS_EMULATION_THREADS", "1")
    with pytest.raises(RuntimeError, match=r"uninitialised_shared_probe .*thread \(\d+,0,0\) read "
                                           r"uninitialised shared memory: 'count'\[0\]"):
        _probe("uninitialised_shared", torch.zeros(blocks, dtype=torch.int32), blocks)
    monkeypatch.setenv("LOMO_KERNELS_EMULATION_SHARED_CHECKS", "0")
    out = _probe("uninitialised_shared", torch.zeros(blocks, dtype=torch.int32), blocks)
    assert out.tolist() == [64 - 1] * blocks


def test_launch_limits_of_shared_memory():
    # dynamic shared memory: 48 KB without the opt-in, up to the kernel's opt-in with it
    n = 48 * 1024 // 4
    out = _probe("dynamic_shared", torch.zeros(1, dtype=torch.int32), 48 * 1024)
    assert out.item() == n * (n - 1) // 2
    with pytest.raises(RuntimeError, match=r"49156 bytes of dynamic shared memory .* exceed the "
                                           r"49152 a block may use without the opt-in"):
        _probe("dynamic_shared", torch.zeros(1, dtype=torch.int32), 48 * 1024 + 4)
    n = 64 * 1024 // 4
    out = _probe("dynamic_shared", torch.zeros(1, dtype=torch.int32), 64 * 1024, 1)
    assert out.item() == n * (n - 1) // 2
    # static (32 KB) and dynamic shared memory together: 48 KB without the opt-in
    out = _probe("static_and_dynamic_shared", torch.zeros(64, dtype=torch.int32), 16 * 1024)
    assert out.tolist() == [3] * 64
    with pytest.raises(RuntimeError, match=r"32768 bytes of static shared memory \(up to 'big'\) "
                                           r"and 16388 dynamic exceed the 49152 a block may use"):
        _probe("static_and_dynamic_shared", torch.zeros(64, dtype=torch.int32), 16 * 1024 + 4)


def test_launch_limit_of_kernel_parameters():
    with pytest.raises(RuntimeError, match=r"parameters of parameter_space_probe take 32768 bytes, "
                                           r"more than a kernel's 32764"):
        _probe("parameter_space", torch.zeros(1, dtype=torch.int32))


def test_vector_access_past_the_tensor_is_an_error():
    # a 16-byte load of the pack after the last full one of a view, inside its storage: on a GPU
    # it reads the neighbour's bytes without a fault
    base = torch.zeros(64, dtype=torch.int16)
    view = base[8:8 + 20]
    with pytest.raises(RuntimeError, match="outside tensor 'out'"):
        _probe("out_of_bounds", view, 20)
    _probe("out_of_bounds", base[8:8 + 24], 20)  # the same pack inside the view is fine
    # a standalone tensor: the pack starts inside it and runs past its end
    with pytest.raises(RuntimeError, match="outside tensor 'out'"):
        _probe("out_of_bounds", torch.zeros(20, dtype=torch.int16), 20)


def test_errors_name_the_kernel_block_and_thread():
    with pytest.raises(RuntimeError, match=r"exited_lane_probe .*probes\.cpp:\d+.*block \(0,0,0\) "
                                           r"thread \(\d+,0,0\)"):
        _probe("exited_lane")


@pytest.mark.parametrize("fibers", ["asm", "ucontext"])
@pytest.mark.parametrize("schedule", ["forward", "reverse", "mixed"])
def test_every_fiber_switch_and_schedule_gives_the_same_bits(fibers, schedule, monkeypatch):
    monkeypatch.setenv("LOMO_KERNELS_EMULATION_FIBERS", fibers)
    monkeypatch.setenv("LOMO_KERNELS_EMULATION_SCHEDULE", schedule)
    shape = (70, 512)
    p0, g = rand(shape, torch.bfloat16, seed=1), rand(shape, torch.bfloat16, 0.05, seed=2)
    st = adalomo_state(shape, seed=3)
    p = p0.clone()
    OPS.adalomo_update_(p, g, st["exp_avg_sq_row"], st["exp_avg_sq_col"], None, None, None, 1e-2,
                        0.1, 1.0, 0.0, 0.5, 1e-30, 1e-3, 1.0, "stochastic", 1, 2)
    monkeypatch.delenv("LOMO_KERNELS_EMULATION_FIBERS")
    monkeypatch.delenv("LOMO_KERNELS_EMULATION_SCHEDULE")
    q = p0.clone()
    st2 = adalomo_state(shape, seed=3)
    OPS.adalomo_update_(q, g, st2["exp_avg_sq_row"], st2["exp_avg_sq_col"], None, None, None, 1e-2,
                        0.1, 1.0, 0.0, 0.5, 1e-30, 1e-3, 1.0, "stochastic", 1, 2)
    assert torch.equal(p.view(torch.int16), q.view(torch.int16))
    assert not torch.equal(p, p0)


def test_bad_settings_are_rejected(monkeypatch):
    p, g = torch.zeros(8), torch.zeros(8)
    for var, value in [("LOMO_KERNELS_EMULATION_THREADS", "0"),
                       ("LOMO_KERNELS_EMULATION_FIBERS", "threads"),
                       ("LOMO_KERNELS_EMULATION_SCHEDULE", "random"),
                       ("LOMO_KERNELS_EMULATION_MEMORY_MODEL", "yes"),
                       ("LOMO_KERNELS_EMULATION_SHARED_CHECKS", "yes"),
                       ("LOMO_KERNELS_EMULATION_SEED", "0")]:
        monkeypatch.setenv(var, value)
        with pytest.raises(RuntimeError, match=var):
            OPS.lomo_update_(p, g, None, None, 0.1, 0.0, 1.0, 0.0, "nearest", 0, 1)
        monkeypatch.delenv(var)


# ---------------------------------------------------------------- the package's kernels


# Kernel launches per update (the launch count is what a GPU pays in fixed costs per parameter).
LAUNCHES = {
    ("lomo_update_", 1): 1,
    ("lomo_update_", 2): 1,
    ("adalomo_update_", 1): 1,  # one tile: statistics and apply in one launch (the last tile)
    ("adalomo_update_", 2): 3,  # statistics, update norm, apply (finalised by tickets)
    ("adalomo_update_", 3): 3,
}


@pytest.mark.parametrize("op,dims", list(LAUNCHES), ids=str)
def test_launches_per_update(op, dims):
    shape = {1: (4099,), 2: (65, 300), 3: (3, 65, 300)}[dims]
    p, g = rand(shape, torch.bfloat16), rand(shape, torch.bfloat16, seed=1)
    ops.reset_emulated_launch_count()
    if op == "lomo_update_":
        ops.lomo_update_(p, g, lr=0.1, backend="cuda_emulated")
    else:
        st = adalomo_state(shape)
        ops.adalomo_update_(p, g, lr=0.1, beta=0.5, backend="cuda_emulated", **st)
    assert ops.emulated_launch_count() == LAUNCHES[(op, dims)]
    ops.reset_emulated_launch_count()
    assert ops.emulated_launch_count() == 0


def test_empty_tensors_launch_nothing():
    ops.reset_emulated_launch_count()
    ops.lomo_update_(torch.zeros(0, 5), torch.zeros(0, 5), lr=0.1, backend="cuda_emulated")
    assert ops.emulated_launch_count() == 0


def test_stats_count_blocks_threads_and_switches():
    before = ops.emulation_stats()
    p, g = rand((4096,), torch.float32), rand((4096,), torch.float32, seed=1)
    ops.lomo_update_(p, g, lr=0.1, backend="cuda_emulated")
    after = ops.emulation_stats()
    # 2048 floats a block: 256 threads x 2 packs of 4
    assert after["blocks"] - before["blocks"] == 2
    assert after["threads"] - before["threads"] == 2 * 256
    assert after["context_switches"] - before["context_switches"] >= 2 * 256
    assert after["fibers"] in ("asm", "ucontext")


def test_backend_resolution():
    assert ops.resolve_backend("cuda_emulated", "cpu") == "cuda_emulated"
    assert ops.resolve_backend("auto", "cpu") != "cuda_emulated"  # never chosen automatically
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        ops.resolve_backend("cuda_emulated", "meta")
    assert ops.get_impl("lomo_update_", "cuda_emulated", "cpu") is OPS.lomo_update_


@pytest.mark.parametrize("multi", [False, True], ids=["one", "multi"])
def test_lomo_grad_sq_through_tickets_matches_float64(multi):
    # The LOMO kernels sum the squared gradients of many blocks through the workspace: a partial
    # per block, a ticket per tensor, a slot per tensor, a ticket per call (the memory model makes
    # a missing fence or a finisher's plain load show here as a NaN or a wrong sum).
    shapes = [(40000,), (9000,), (5, 3000)] if multi else [(70000,)]
    gs = [rand(s, torch.float32, seed=i + 1) for i, s in enumerate(shapes)]
    ps = [rand(s, torch.float32, seed=10 + i) for i, s in enumerate(shapes)]
    acc = torch.full((1,), 0.5)
    if multi:
        ops.lomo_update_multi_(ps, gs, lr=0.1, grad_sq=acc, backend="cuda_emulated")
    else:
        ops.lomo_update_(ps[0], gs[0], lr=0.1, grad_sq=acc, backend="cuda_emulated")
    want = 0.5 + sum(float(g.double().square().sum()) for g in gs)
    assert acc.item() == pytest.approx(want, rel=1e-5)


def test_every_kernel_states_its_launch_bounds_to_the_emulation():
    # The emulation cannot read __launch_bounds__ (an attribute); each kernel repeats its bound as
    # its first statement, LOMO_BOUNDS(n), which fails a larger block. Both must agree.
    import pathlib
    import re

    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "cuda"
    kernels = 0
    for path in sorted(csrc.glob("*.cu*")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("__global__"):
                continue
            m = re.match(r"__global__ void __launch_bounds__\(([^,)]+)[,)].*\{$", line)
            assert m, f"{path.name}:{i + 1}: a kernel without __launch_bounds__: {line}"
            assert lines[i + 1].strip() == f"LOMO_BOUNDS({m.group(1)});", (
                f"{path.name}:{i + 2}: the first statement must be LOMO_BOUNDS({m.group(1)})")
            kernels += 1
    assert kernels >= 8
