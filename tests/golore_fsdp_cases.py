"""The cases test_golore_fsdp.py runs on 2 and 3 gloo ranks (tests/distributed_harness.py):
GoLore / GaLore on parameters sharded by fully_shard, against the single-process run on the
whole global batch (computed on every rank, ``independent_ranks=True``).

The model is fsdp_cases.Net, with a rank per weight so that every path runs: l1.weight (7 x 5,
rank 2) is projected on the right (uneven rows 4+3 / 3+3+1; its SVD sketch k = 4 < 5 iterates),
mix.weight (3 x 4 x 7 as 3 x 28, rank 1) on the left (iterated sketch), l2.weight (2 x 12,
rank 1) on the left with an exact sketch (k = d) and an empty shard on 3 ranks; head.weight
(1 x 2) and the 1-d parameters are trained at full rank (empty shards on every rank but 0)."""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from fsdp_cases import (STEPS, Net, assert_same, batch, checkpoint_and_resume, close, first_row_of,
                        loss_of, params_of, poisoned_step, raises, shard, states_of, train,
                        train_one_backward)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard

from lomo_kernels import GoLore

RANKS = {"l1.weight": 2, "mix.weight": 1, "l2.weight": 1}
LOW_RANK = tuple(RANKS)


def groups(model):
    """One param group per parameter, in the model's order (the ordinals key the projections)."""
    return [{"params": [p], "rank": RANKS.get(n, 2)} for n, p in model.named_parameters()]


def options(projection, side="auto", backend="torch", **extra):
    kw = dict(lr=0.05, update_proj_gap=2, projection=projection, side=side, weight_decay=0.1,
              clip_grad_norm=0.3, backend=backend, seed=3)
    kw.update(extra)
    return kw


def tolerance(projection):
    """fp32: 1e-5 for random projections. An SVD refresh turns the rounding differences of the
    summed per-shard products into projector differences divided by the singular-value gap."""
    return 1e-5 if projection == "random" else 1e-4


def replicated_agree(opt, model, ctx):
    """Every Replicate() state tensor (projectors, left-side moments) is bitwise the same on
    every rank."""
    for n, p in model.named_parameters():
        for k, v in opt.state[p].items():
            if torch.is_tensor(v) and v.placements == (Replicate(),):
                mine = v.to_local().contiguous()
                everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
                dist.all_gather(everyone, mine)
                assert all(torch.equal(e, mine) for e in everyone), f"{n}.{k} differs across ranks"


def compare(got_params, got_states, ref, ref_opt, tol, what=""):
    for n, want in params_of(ref).items():
        close(got_params[n], want, f"{what}parameter {n}", rtol=tol, atol=tol * 1e-2)
    for n, want in states_of(ref_opt, ref).items():
        for k, v in want.items():
            if torch.is_tensor(v):
                close(got_states[n][k], v, f"{what}state {n}.{k}", rtol=tol, atol=tol * 1e-2)
            else:
                assert got_states[n][k] == v, (n, k, got_states[n][k], v)


# ---------------------------------------------------------------------------------------------
# Equivalence with the single-process run on the whole batch
# ---------------------------------------------------------------------------------------------


def equivalence(ctx, projection, side, backend):
    """fp32, 4 steps (refreshes at updates 0 and 2, the moments carried over), weight decay,
    two-pass clipping, then a plain backward: reshard_after_forward True and False give bitwise
    the same result, within ``tolerance`` of the single-process run; replicated state is the
    same on every rank."""
    kw = options(projection, side, backend)
    runs = {}
    for reshard in (True, False):
        m = shard(Net(), reshard)
        opt = GoLore(groups(m), **kw)
        norms = train(m, opt, STEPS, ctx)
        replicated_agree(opt, m, ctx)
        runs[reshard] = (params_of(m), states_of(opt, m), norms)
    assert_same(runs[True][0], runs[False][0], "parameters, reshard_after_forward True vs False")
    assert_same(runs[True][1], runs[False][1], "state, reshard_after_forward True vs False")
    ref = Net()
    ref_opt = GoLore(groups(ref), independent_ranks=True, **kw)
    ref_norms = train(ref, ref_opt, STEPS)
    params, states, norms = runs[True]
    for n in LOW_RANK:
        assert states[n]["refreshes"] == 2 and "projector" in states[n], n
    assert "projector" not in states["head.weight"]
    for n, want in params_of(ref).items():
        assert not torch.equal(want, Net().state_dict()[n]), f"{n} was not trained"
    compare(params, states, ref, ref_opt, tolerance(projection))
    for a, b in zip(norms, ref_norms):
        assert math.isclose(a, b, rel_tol=1e-5), (norms, ref_norms)


def one_backward_clipping(ctx, projection):
    """clip_mode="previous" with weight decay: each step's last_grad_norm is the global norm of
    the gradient (not of the update written into its buffer), the parameters follow the single
    process."""
    kw = options(projection, clip_mode="previous")
    m, ref = shard(Net()), Net()
    opt, ref_opt = GoLore(groups(m), **kw), GoLore(groups(ref), independent_ranks=True, **kw)
    train_one_backward(ctx, m, opt, ref, ref_opt)
    compare(params_of(m), states_of(opt, m), ref, ref_opt, tolerance(projection))


def accumulation(ctx, projection):
    """accumulation_steps=2 on shards (each weight's buffer: its local rows), exact clipping of
    the accumulated gradient with no grad_norm pass: equal to the single process's K=1 steps on
    both micro-batches at once (grad_norm + fused_backward), refreshes included."""
    kw = options(projection)
    m, ref = shard(Net()), Net()
    opt = GoLore(groups(m), accumulation_steps=2, **kw)
    ref_opt = GoLore(groups(ref), independent_ranks=True, **kw)
    for step in range(STEPS):
        for i in range(2):
            x, y = batch(10 * step + i, ctx)
            opt.fused_backward(loss_of(m, x, y) / 2, None)  # the second one applies the window
        parts = [batch(10 * step + i) for i in range(2)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        ref_opt.grad_norm(loss_of(ref, x, y))
        ref_opt.fused_backward(loss_of(ref, x, y), None)
        got, want = float(opt.last_grad_norm), float(ref_opt.last_grad_norm)
        assert want > 0 and math.isclose(got, want, rel_tol=1e-5), (step, got, want)
    assert float(opt.clip_coef) < 1.0  # the clipping was active
    replicated_agree(opt, m, ctx)
    compare(params_of(m), states_of(opt, m), ref, ref_opt, tolerance(projection))


# ---------------------------------------------------------------------------------------------
# Non-finite gradients on one rank
# ---------------------------------------------------------------------------------------------


def _poison(ctx, model, names, when, sharded):
    """NaN in the first element of rank 1's shard of each of ``names`` (``sharded``), or at that
    element of the whole gradient (the single-process model), while ``when['on']``. Registered
    before the optimizer's hooks."""
    for name in names:
        p = dict(model.named_parameters())[name]
        row = first_row_of(1, p.shape[0], ctx.world_size)

        def hook(p, row=row):
            if when["on"]:
                with torch.no_grad():
                    if not sharded:
                        p.grad[row].view(-1)[0] = float("nan")
                    elif ctx.rank == 1:
                        p.grad.to_local().view(-1)[0] = float("nan")

        p.register_post_accumulate_grad_hook(hook)


def nonfinite_on_one_rank(ctx, projection):
    """A NaN in rank 1's shard of a right-projected, a left-projected and a full-rank parameter:
    each is left unchanged, moments included, on every rank (as one process leaves the whole
    parameter); a due SVD refresh waits, on every rank; the others train; every rank warns."""
    names = ("l1.weight", "mix.weight", "l1.bias")
    kw = options(projection, update_proj_gap=1)  # a refresh at every update
    on, ref_on = {"on": False}, {"on": False}
    m, ref = shard(Net()), Net()
    _poison(ctx, m, names, on, sharded=True)
    _poison(ctx, ref, names, ref_on, sharded=False)
    opt, ref_opt = GoLore(groups(m), **kw), GoLore(groups(ref), independent_ranks=True, **kw)
    before, st_before = poisoned_step(ctx, m, opt, ref, ref_opt, on, ref_on)
    after, st_after = params_of(m), states_of(opt, m)
    compare(after, st_after, ref, ref_opt, tolerance(projection))
    tensors = lambda st: {k: v for k, v in st.items() if torch.is_tensor(v)}  # noqa: E731
    for n in names:
        assert torch.equal(after[n], before[n]), f"the poisoned {n} changed"
        kept = tensors(st_after[n])
        if projection == "random" and "projector" in kept:
            # a due random refresh happens (it does not depend on the gradient): the first
            # moment moved into the new subspace, the second moment is untouched
            kept = {"exp_avg_sq": kept["exp_avg_sq"]}
        assert_same(kept, {k: tensors(st_before[n])[k] for k in kept}, f"poisoned state {n}")
        if "projector" in st_after[n]:
            want = 1 if projection == "svd" else 2  # the SVD refresh waited
            assert st_after[n]["refreshes"] == want, (n, st_after[n]["refreshes"])
    assert not torch.equal(after["l2.weight"], before["l2.weight"]), "the others did not train"


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def dcp_round_trip(ctx, projection):
    """Save model and optimizer with torch.distributed.checkpoint after 2 steps, load them into a
    fresh model and optimizer: the next 2 steps, with a refresh, are bitwise those of the
    uninterrupted run."""
    kw = options(projection)

    def placements(st):
        assert st["l1.weight"]["projector"].placements == (Replicate(),)
        assert st["l1.weight"]["exp_avg"].placements == (Shard(0),)  # right: rows of R
        assert st["mix.weight"]["exp_avg"].placements == (Replicate(),)  # left: r x n
        assert st["norm.weight"]["exp_avg_sq"].placements == (Shard(0),)  # full rank
        assert st["l1.weight"]["step"] == 2 and st["l1.weight"]["refreshes"] == 1

    checkpoint_and_resume(ctx, lambda m: GoLore(groups(m), **kw), f"golore_{projection}",
                          placements)


# ---------------------------------------------------------------------------------------------
# What stays refused
# ---------------------------------------------------------------------------------------------


def refusals(ctx):
    """HSDP (a 2-d mesh) and Shard(1): a clear error naming the parameter; nothing changes and
    nothing stays hooked (a later optimizer on the same parameters takes them silently)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, ctx.world_size), mesh_dim_names=("replicate", "shard"))
    m = Net()
    fully_shard(m, mesh=mesh)
    before = params_of(m)
    raises(ValueError, "on a 2-d device mesh", lambda: GoLore(m, rank=2))
    assert_same(params_of(m), before, "parameters")
    m2 = torch.nn.Sequential(torch.nn.Linear(6, 6))
    fully_shard(m2, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
    raises(ValueError, "parameter 0.weight is a DTensor placed (Shard(dim=1),)",
           lambda: GaLore_(m2))
    m3 = shard(Net())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no OptimizerReplacedWarning: the failed one owns nothing
        GoLore(m3, rank=2).remove_hooks()


def GaLore_(model):  # noqa: N802 - the class, under a name that does not shadow the import
    from lomo_kernels import GaLore

    return GaLore(model, rank=2)


def bf16_smoke(ctx, projection):
    """bf16 weights, stochastic rounding, weight decay: the run is finite, every parameter moves
    and the replicated state is the same on every rank."""
    m = shard(Net(dtype=torch.bfloat16))
    opt = GoLore(groups(m), **options(projection, rounding="stochastic"))
    before = params_of(m)
    for step in range(3):
        x, y = batch(step, ctx, torch.bfloat16)
        loss = loss_of(m, x, y)
        opt.grad_norm(loss)  # exact clipping: the norm first
        opt.fused_backward(loss)
    after = params_of(m)
    for n in before:
        assert torch.isfinite(after[n]).all() and not torch.equal(after[n], before[n]), n
    replicated_agree(opt, m, ctx)
