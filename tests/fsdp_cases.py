"""The cases test_fsdp.py runs on 2 and 3 gloo ranks (tests/distributed_harness.py): each function
takes the job's ``Ctx`` and string arguments and raises on failure. Every rank runs the same case;
the single-process reference runs on every rank too, on the whole global batch
(``independent_ranks=True``: it is a plain model under a multi-rank process group on purpose).

The model has every kind of shard: uneven rows (7 rows on 2 or 3 ranks), a 3-d parameter (whole
slices split), 1-d parameters, and parameters with fewer rows than ranks (empty local shards)."""

from __future__ import annotations

import copy
import math
import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from lomo_kernels import (AdaLomo, GradNormSpikeWarning, IndependentRanksWarning,
                          Lomo, NonFiniteGradientWarning, reference)

CLASSES = {"Lomo": Lomo, "AdaLomo": AdaLomo}
LR = {"Lomo": 0.1, "AdaLomo": 0.05}
STEPS = 4  # the last one is a plain loss.backward() + step()
GLOBAL_BATCH = 6


class Slices(torch.nn.Module):
    """A 3-d parameter: 3 slices of 4 x 7 matrices (AdaLomo factors each slice)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 4, 7) * 0.3)

    def forward(self, x):
        return x @ self.weight.reshape(-1, self.weight.shape[-1]).T  # (batch, slices * 4)


class Net(torch.nn.Module):
    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = torch.nn.Linear(5, 7)  # 7 rows: 4+3 on 2 ranks, 3+3+1 on 3
        self.norm = torch.nn.LayerNorm(7)  # 1-d
        self.mix = Slices()  # slices 2+1, 1+1+1
        self.l2 = torch.nn.Linear(12, 2)  # 2 rows: an empty shard on 3 ranks
        self.head = torch.nn.Linear(2, 1)  # 1 row: empty shards on every rank but 0
        self.to(dtype)

    def forward(self, x):
        h = self.norm(torch.tanh(self.l1(x)))
        return self.head(torch.tanh(self.l2(torch.tanh(self.mix(h)))))


def shard(model, reshard=True, mp=None):
    kw = {"reshard_after_forward": reshard}
    if mp is not None:
        kw["mp_policy"] = mp
    for unit in (model.l1, model.mix, model.l2):
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    return model


def batch(step, ctx=None, dtype=torch.float32):
    """The global batch of ``step``, or this rank's part of it."""
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(GLOBAL_BATCH, 5, generator=g), torch.randn(GLOBAL_BATCH, 1, generator=g)
    if ctx is not None:
        x, y = x.chunk(ctx.world_size)[ctx.rank], y.chunk(ctx.world_size)[ctx.rank]
    return x.to(dtype), y


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x).float(), y)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def params_of(model):
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def states_of(opt, model):
    return {n: {k: full(v).clone() if torch.is_tensor(v) else v
                for k, v in opt.state.get(p, {}).items()}
            for n, p in model.named_parameters()}


def options(cls_name, backend, **extra):
    kw = dict(lr=LR[cls_name], clip_grad_norm=0.3, clip_grad_value=0.2, weight_decay=0.1,
              backend=backend)
    kw.update(extra)
    return kw


def train(model, opt, steps, ctx=None, lr=None, first=0):
    """Two-pass clipping (grad_norm, fused_backward) at every step but the last of a full run,
    which is a plain loss.backward() + step() (the Trainer path). Returns the gradient norms."""
    norms = []
    for step in range(first, first + steps):
        x, y = batch(step, ctx)
        loss = loss_of(model, x, y)
        if step < STEPS - 1:
            norms.append(float(opt.grad_norm(loss)))
            opt.fused_backward(loss, lr)
        else:  # exact clipping of a plain backward: grad_norm first (else it is refused)
            norms.append(float(opt.grad_norm(loss)))
            loss.backward()
            opt.step()
    return norms


def close(got, want, what, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same(a, b, what):
    """Bitwise equality of two dicts of tensors (or of dicts of them)."""
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], dict):
            assert_same(a[k], b[k], f"{what} {k}")
        elif torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), f"{what} {k} differs"
        else:
            assert a[k] == b[k], f"{what} {k}: {a[k]} != {b[k]}"


def warns(category, match, fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    hits = [w for w in caught if issubclass(w.category, category) and match in str(w.message)]
    assert hits, f"expected {category.__name__} ({match!r}), got {[str(w.message) for w in caught]}"
    return out


def raises(exc, match, fn):
    try:
        fn()
    except exc as e:
        assert match in str(e), f"expected {match!r} in: {e}"
        return e
    raise AssertionError(f"expected {exc.__name__} ({match!r})")


def first_row_of(rank, rows, world_size):
    """The global index of the first row a rank holds (torch.chunk layout)."""
    return min(rows, math.ceil(rows / world_size) * rank)


# ---------------------------------------------------------------------------------------------
# Equivalence with the single-process run on the whole batch
# ---------------------------------------------------------------------------------------------


def equivalence(ctx, cls_name, backend):
    """fp32: several steps with weight decay, value clipping and two-pass norm clipping, then a
    plain backward; reshard_after_forward True and False give bitwise the same result, within
    1e-5 of the single-process run."""
    cls = CLASSES[cls_name]
    kw = options(cls_name, backend)
    runs = {}
    for reshard in (True, False):
        m = shard(Net(), reshard)
        opt = cls(m, **kw)
        norms = train(m, opt, STEPS, ctx)
        runs[reshard] = (params_of(m), states_of(opt, m), norms)
    assert_same(runs[True][0], runs[False][0], "parameters, reshard_after_forward True vs False")
    assert_same(runs[True][1], runs[False][1], "state, reshard_after_forward True vs False")
    ref = Net()
    ref_opt = cls(ref, independent_ranks=True, **kw)
    ref_norms = train(ref, ref_opt, STEPS)
    params, states, norms = runs[True]
    for n, want in params_of(ref).items():
        assert not torch.equal(want, Net().state_dict()[n]), f"{n} was not trained"
        close(params[n], want, f"parameter {n}")
    for n, want in states_of(ref_opt, ref).items():
        for k, v in want.items():
            if torch.is_tensor(v):
                close(states[n][k], v, f"state {n}.{k}", atol=1e-12)
            else:
                assert states[n][k] == v, (n, k)
    for a, b in zip(norms, ref_norms):
        assert math.isclose(a, b, rel_tol=1e-5), (norms, ref_norms)


def train_one_backward(ctx, m, opt, ref, ref_opt):
    """STEPS steps of one fused_backward each, sharded and single-process: every step's
    last_grad_norm agrees within 1e-5."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradNormSpikeWarning)  # a healthy run: no false alarm
        for step in range(STEPS):
            for model, o, c in ((m, opt, ctx), (ref, ref_opt, None)):
                x, y = batch(step, c)
                o.fused_backward(loss_of(model, x, y), None)
            got, want = float(opt.last_grad_norm), float(ref_opt.last_grad_norm)
            assert want > 0 and math.isclose(got, want, rel_tol=1e-5), (step, got, want)


def one_backward_clipping(ctx, cls_name, backend):
    """clip_mode="previous" (one fused_backward per step, no grad_norm pass): each step's
    last_grad_norm is the global norm (the shards' parts summed across ranks) and the parameters
    follow the single-process run within 1e-5."""
    cls = CLASSES[cls_name]
    kw = options(cls_name, backend, clip_mode="previous")
    m, ref = shard(Net()), Net()
    opt, ref_opt = cls(m, **kw), cls(ref, independent_ranks=True, **kw)
    train_one_backward(ctx, m, opt, ref, ref_opt)
    params = params_of(m)
    for n, want in params_of(ref).items():
        close(params[n], want, f"parameter {n}")


def accumulation(ctx, cls_name, backend):
    """accumulation_steps=2: two micro-batches per step (loss / 2; the last step through plain
    backwards and step()), exact clipping from the accumulated shards' norm without a grad_norm
    pass: the parameters and each step's norm follow the single-process K=1 run on both
    micro-batches at once (grad_norm + fused_backward) within 1e-5."""
    cls = CLASSES[cls_name]
    kw = options(cls_name, backend)
    m, ref = shard(Net()), Net()
    opt = cls(m, accumulation_steps=2, **kw)
    ref_opt = cls(ref, independent_ranks=True, **kw)
    for step in range(3):
        for i in range(2):
            x, y = batch(10 * step + i, ctx)
            if step < 2:
                opt.fused_backward(loss_of(m, x, y) / 2, None)
            else:
                (loss_of(m, x, y) / 2).backward()
        if step == 2:
            opt.step()
        parts = [batch(10 * step + i) for i in range(2)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        ref_opt.grad_norm(loss_of(ref, x, y))
        ref_opt.fused_backward(loss_of(ref, x, y), None)
        got, want = float(opt.last_grad_norm), float(ref_opt.last_grad_norm)
        assert want > 0 and math.isclose(got, want, rel_tol=1e-5), (step, got, want)
    assert float(opt.clip_coef) < 1.0  # the clipping was active
    params = params_of(m)
    for n, want in params_of(ref).items():
        close(params[n], want, f"parameter {n}")
    raises(RuntimeError, "not supported for parameters sharded by fully_shard",
           lambda: (loss_of(m, *batch(99, ctx)).backward(), opt.state_dict()))
    opt.step()


def mixed_precision(ctx, cls_name, backend):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on fp32 parameters: equal to a
    single process that computes each rank's bf16 gradient the same way, averages them in fp32
    and updates fp32 parameters."""
    cls = CLASSES[cls_name]
    kw = options(cls_name, backend)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    m = shard(Net(), mp=policy)
    opt = cls(m, **kw)
    master = Net()
    ref_opt = cls(master, independent_ranks=True, **kw)
    for step in range(STEPS - 1):
        x, y = batch(step, ctx)
        loss = loss_of(m, x, y)
        opt.grad_norm(loss)
        opt.fused_backward(loss)
        grads = None
        for r in range(ctx.world_size):  # every rank's bf16 gradient, averaged in fp32
            low = copy.deepcopy(master).to(torch.bfloat16)
            rx, ry = batch(step, type(ctx)(r, ctx.world_size, "", "", None))
            loss_of(low, rx.to(torch.bfloat16), ry).backward()
            g = [p.grad.float() for p in low.parameters()]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        grads = [g / ctx.world_size for g in grads]
        # a loss whose gradient is exactly the averaged one
        surrogate = sum((p * g).sum() for p, g in zip(master.parameters(), grads))
        ref_opt.grad_norm(surrogate)
        ref_opt.fused_backward(surrogate)
    for n, want in params_of(master).items():
        close(params_of(m)[n], want, f"parameter {n}", rtol=1e-5, atol=1e-6)


def bf16_step(ctx, cls_name, backend):
    """bf16 parameters: each step's result is within 1 ulp of the reference op applied to the
    whole parameter with the gradient the shards received (gathered), state within fp32
    rounding."""
    from conftest import ulp_distance

    cls = CLASSES[cls_name]
    m = shard(Net(dtype=torch.bfloat16))
    got_grads = {}

    def capture(p):  # registered before the optimizer's hook, so it runs first
        got_grads[p] = p.grad.full_tensor()

    for p in m.parameters():
        p.register_post_accumulate_grad_hook(capture)
    opt = cls(m, lr=LR[cls_name], weight_decay=0.1, clip_grad_value=0.2, backend=backend)
    named = dict(m.named_parameters())
    for step in range(3):
        before = params_of(m)
        st_before = states_of(opt, m)
        x, y = batch(step, ctx, torch.bfloat16)
        opt.fused_backward(loss_of(m, x, y))
        after = params_of(m)
        for n, p in named.items():
            want, g, group = before[n].clone(), got_grads[p], opt.param_groups[0]
            t = st_before[n]["step"] + 1
            if cls is Lomo:
                reference.lomo_update_(want, g, None, None, group["lr"], 0.1, 1.0, 0.2,
                                       "nearest", 0, t)
            else:
                st = {k: v.clone() for k, v in st_before[n].items() if torch.is_tensor(v)}
                reference.adalomo_update_(
                    want, g, st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col"),
                    st.get("exp_avg_sq"), None, None, group["lr"], 0.1, opt._loss_scale(),
                    0.2, opt._beta(t, group["decay_rate"]), *group["eps"],
                    group["clip_threshold"], "nearest", 0, t)
                for k, v in st.items():
                    close(states_of(opt, m)[n][k], v, f"state {n}.{k}", rtol=1e-5, atol=1e-12)
            ulps = int(ulp_distance(after[n], want).max())
            assert ulps <= 1, f"step {step}: {n} is {ulps} ulp from the reference"
            assert not torch.equal(after[n], before[n]), f"{n} was not updated"


# ---------------------------------------------------------------------------------------------
# Non-finite gradients on one rank, clipping and the loss scaler agree across ranks
# ---------------------------------------------------------------------------------------------


def _poison(ctx, model, row, when):
    """NaN at element [row, 0] of l1.weight's gradient: rank 1's local shard only (sharded), or
    the whole gradient (the single-process model, ``ctx`` None), while ``when['on']``. Registered
    after fully_shard and before the optimizer, so that it runs before the update."""
    def hook(p):
        if not when["on"]:
            return
        with torch.no_grad():
            if ctx is None:
                p.grad[row, 0] = float("nan")
            elif ctx.rank == 1:
                p.grad.to_local()[0, 0] = float("nan")

    model.l1.weight.register_post_accumulate_grad_hook(hook)  # before the optimizer's hook


def poisoned_step(ctx, m, opt, ref, ref_opt, on, ref_on):
    """A clean step of the sharded and the single-process run, then one fused_backward of each
    with the poison on (``on``, ``ref_on``) and no clipping, so that the NaN reaches the update
    pass; every rank must warn. Returns the sharded parameters and state before that step."""
    train(m, opt, 1, ctx)
    train(ref, ref_opt, 1)
    before, st_before = params_of(m), states_of(opt, m)
    on["on"] = ref_on["on"] = True
    for o in (opt, ref_opt):
        o.clip_coef = o.clip_grad_norm = None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt.fused_backward(loss_of(m, *batch(1, ctx)))
    assert any(issubclass(w.category, NonFiniteGradientWarning) for w in seen), "no warning"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteGradientWarning)
        ref_opt.fused_backward(loss_of(ref, *batch(1)))
    return before, st_before


def nonfinite_on_one_rank(ctx, cls_name, backend):
    """A NaN in one rank's shard: AdaLomo leaves that parameter and its state unchanged on every
    rank (Lomo that element), every rank warns; in the grad_norm pass the norm is non-finite on
    every rank and the next fused_backward changes nothing anywhere."""
    cls = CLASSES[cls_name]
    kw = options(cls_name, backend)
    row = first_row_of(1, 7, ctx.world_size)
    on, ref_on = {"on": False}, {"on": False}
    m = shard(Net())
    _poison(ctx, m, row, on)
    opt = cls(m, **kw)
    ref = Net()
    _poison(None, ref, row, ref_on)
    ref_opt = cls(ref, independent_ranks=True, **kw)
    before, st_before = poisoned_step(ctx, m, opt, ref, ref_opt, on, ref_on)
    after, want = params_of(m), params_of(ref)
    for n in after:
        close(after[n], want[n], f"parameter {n}")
    w = after["l1.weight"]
    if cls is AdaLomo:
        assert torch.equal(w, before["l1.weight"]), "the poisoned parameter changed"
        tensors = lambda st: {k: v for k, v in st["l1.weight"].items() if torch.is_tensor(v)}
        assert_same(tensors(states_of(opt, m)), tensors(st_before), "poisoned state")
    else:
        assert torch.equal(w[row, 0], before["l1.weight"][row, 0])
        assert not torch.equal(w[row, 1:], before["l1.weight"][row, 1:])
    assert not torch.equal(after["l2.weight"], before["l2.weight"]), "the others did not train"
    # the grad_norm pass sees the NaN on one rank only: every rank skips the next update
    opt.clip_grad_norm = 0.3
    before = params_of(m)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        x, y = batch(2, ctx)
        loss = loss_of(m, x, y)
        norm = opt.grad_norm(loss)
        on["on"] = False
        opt.fused_backward(loss)
    assert not math.isfinite(float(norm)), float(norm)
    assert any(issubclass(w.category, NonFiniteGradientWarning) for w in seen)
    assert_same(params_of(m), before, "parameters after a skipped step")


def loss_scaler_agrees(ctx, backend):
    """fp16 Lomo: an overflow on one rank (in the grad_norm pass, then in the update pass) halves
    the loss scale on every rank alike."""
    row = first_row_of(1, 7, ctx.world_size)
    on = {"on": False}
    m = shard(Net(dtype=torch.float16))
    _poison(ctx, m, row, on)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = Lomo(m, lr=0.05, backend=backend)
        scales = [opt.loss_scaler.loss_scale]
        for step, where in enumerate(("norm", "update", None)):
            x, y = batch(step, ctx, torch.float16)
            loss = loss_of(m, x, y)
            on["on"] = where == "norm"
            opt.grad_norm(loss)
            on["on"] = where == "update"
            opt.fused_backward(loss)
            scales.append(opt.loss_scaler.loss_scale)
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, scales)
    assert all(s == scales for s in everyone), everyone
    assert scales[1] == scales[0] / 2 and scales[2] == scales[1] / 2, scales


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def dcp_round_trip(ctx, cls_name, backend):
    """Save model and optimizer with torch.distributed.checkpoint after 2 steps, load them into a
    fresh model and optimizer: the next steps are bitwise those of the uninterrupted run."""
    cls = CLASSES[cls_name]
    kw = options(cls_name, backend)

    def placements(st):  # AdaLomo's state is DTensors, rows sharded, 2-d columns replicated
        if cls is AdaLomo:
            assert st["l1.weight"]["exp_avg_sq_row"].placements == (Shard(0),)
            assert st["l1.weight"]["exp_avg_sq_col"].placements == (Replicate(),)
            assert st["mix.weight"]["exp_avg_sq_col"].placements == (Shard(0),)
            assert st["norm.weight"]["exp_avg_sq"].placements == (Shard(0),)
            assert st["l1.weight"]["step"] == 2

    checkpoint_and_resume(ctx, lambda m: cls(m, **kw), f"{cls_name}_{backend}", placements)


def checkpoint_and_resume(ctx, make_opt, name, check_saved):
    """Train a sharded Net with ``make_opt(model)`` 2 steps, save model and optimizer with
    torch.distributed.checkpoint (``check_saved`` sees the optimizer's state dict first), train
    2 more; load the checkpoint into a fresh model (another init) and optimizer and train the
    same 2 steps: parameters and state are bitwise those of the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.path.join(ctx.tmpdir, f"ckpt_{name}")
    m = shard(Net())
    opt = make_opt(m)
    train(m, opt, 2, ctx)
    msd, osd = get_state_dict(m, opt)
    check_saved(osd["state"])
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    train(m, opt, 2, ctx, first=2)
    want_p, want_s = params_of(m), states_of(opt, m)

    m2 = shard(Net(seed=7))
    opt2 = make_opt(m2)
    msd2, osd2 = get_state_dict(m2, opt2)
    sd = {"model": msd2, "optim": osd2}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(m2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    train(m2, opt2, 2, ctx, first=2)
    assert_same(params_of(m2), want_p, "resumed parameters")
    assert_same(states_of(opt2, m2), want_s, "resumed state")


# ---------------------------------------------------------------------------------------------
# DDP and replicated parameters; bad input
# ---------------------------------------------------------------------------------------------


def before_init(rank, world_size):
    """Run by every worker before torch.distributed is initialised: an optimizer made then."""
    m = Net()
    return m, AdaLomo(m, lr=0.05)


def ddp_refused(ctx):
    """DistributedDataParallel: a clear error, nothing changes. Plain parameters under several
    ranks: a warning, at construction or (process group initialised later) at the first backward,
    once; independent_ranks=True silences it."""
    m = Net()
    before = params_of(m)
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    for cls in (Lomo, AdaLomo):
        raises(TypeError, "DistributedDataParallel", lambda: cls(ddp))
        opt = warns(IndependentRanksWarning, "fully_shard", lambda: cls(ddp.module))
        opt.remove_hooks()
        opt = warns(IndependentRanksWarning, "fully_shard", lambda: cls(list(ddp.parameters())))
        opt.remove_hooks()
    assert_same(params_of(m), before, "parameters")
    early, early_opt = ctx.before_init
    x, y = batch(0, ctx)
    warns(IndependentRanksWarning, "plain (unsharded) tensor",
          lambda: early_opt.fused_backward(loss_of(early, x, y)))
    assert all(p.grad is None for p in early.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", IndependentRanksWarning)  # said once per optimizer
        loss_of(early, x, y).backward()
        early_opt.step()
        AdaLomo(Net(), lr=0.05, independent_ranks=True)
    # what independent_ranks=True means: each rank trains its own copy
    own = Net()
    opt = AdaLomo(own, lr=0.05, independent_ranks=True)
    opt.fused_backward(loss_of(own, x, y))
    mine = params_of(own)["l1.weight"]
    everyone = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, mine)
    assert not torch.equal(everyone[0], everyone[1]), "ranks trained on different data"


def built_before_fully_shard(ctx, cls_name):
    cls = CLASSES[cls_name]
    m = Net()
    warns(IndependentRanksWarning, "create the optimizer after it", lambda: cls(m)).remove_hooks()
    opt = cls(m, lr=LR[cls_name], independent_ranks=True)
    shard(m)
    before = params_of(m)
    x, y = batch(0, ctx)
    raises(RuntimeError, "fully_shard was applied after",
           lambda: opt.fused_backward(loss_of(m, x, y)))
    assert_same(params_of(m), before, "parameters")


def shard_dim_1(ctx, cls_name):
    cls = CLASSES[cls_name]
    m = torch.nn.Sequential(torch.nn.Linear(6, 6))
    fully_shard(m, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
    before = params_of(m)
    raises(ValueError, "parameter 0.weight is a DTensor placed (Shard(dim=1),)",
           lambda: cls(m, lr=0.1))
    assert_same(params_of(m), before, "parameters")


def process_group_mismatch(ctx, cls_name):
    """Parameters sharded over different groups, and ranks that pass different parameters."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    cls = CLASSES[cls_name]
    singles = [dist.new_group([r]) for r in range(ctx.world_size)]
    m = Net()
    fully_shard(m.l1, mesh=DeviceMesh.from_group(singles[ctx.rank], "cpu"))
    fully_shard(m, mesh=init_device_mesh("cpu", (ctx.world_size,)))
    before = params_of(m)
    raises(ValueError, "process group mismatch", lambda: cls(m, lr=0.1))
    m2 = shard(Net())
    params = list(m2.parameters())
    if ctx.rank == 0:
        params = params[:-1]
    raises(RuntimeError, "disagree on the sharded parameters", lambda: cls(params, lr=0.1))
    assert_same(params_of(m), before, "parameters")
    mesh = init_device_mesh("cpu", (ctx.world_size,))
    rep = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Replicate()]))
    raises(ValueError, "placed (Replicate(),)", lambda: cls([rep], lr=0.1))
