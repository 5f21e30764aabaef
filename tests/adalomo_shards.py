"""Simulated sharding of the staged AdaLomo op (no process group): a parameter is cut along dim 0
into shards, each shard runs stages 1-3 on its own workspace, and the workspace header regions
are summed across shards between the stages, as an all-reduce would. Used to test every
backend's stages against its own one-call update."""

import torch

from lomo_kernels import ops, reference


def split_rows(t: torch.Tensor, sizes):
    """Contiguous pieces of ``t`` along dim 0 (sizes may include 0)."""
    return [piece.contiguous() for piece in torch.split(t, sizes, dim=0)]


def run_sharded(impl, param, grad, state, h, sizes, backend, rounding="nearest", seed=5, step=2,
                grad_sq=None):
    """Update the shards of ``param`` with ``impl`` in stages and return (new param, new state,
    found_inf per shard). ``state`` maps exp_avg_sq_row/col or exp_avg_sq to float32 tensors of
    the whole parameter; ``h`` holds lr, wd, ls, cgv, coef, beta, ct."""
    shape = tuple(param.shape)
    p_sh, g_sh = split_rows(param, sizes), split_rows(grad, sizes)
    factored = param.dim() >= 2
    if factored:
        rows = split_rows(state["exp_avg_sq_row"], sizes)
        # a 2-D parameter's columns are whole on every shard: each keeps its own copy of c
        cols = ([state["exp_avg_sq_col"].clone() for _ in sizes] if param.dim() == 2
                else split_rows(state["exp_avg_sq_col"], sizes))
        vs = [None] * len(sizes)
    else:
        rows = cols = [None] * len(sizes)
        vs = split_rows(state["exp_avg_sq"], sizes)
    numel = ops.workspace_numel("adalomo_update_", [p.shape for p in p_sh] + [shape],
                                backend=backend, device=param.device)
    ws = [torch.zeros(numel, device=param.device) for _ in sizes]
    found = [torch.zeros(1, device=param.device) for _ in sizes]
    coef = None if h["coef"] is None else torch.tensor(h["coef"], device=param.device)
    after1, after2 = reference.adalomo_workspace_regions(shape)
    global_rows = shape[-2] if factored else 0
    for stage, regions in ((1, after1), (2, after2), (3, [])):
        for i in range(len(sizes)):
            impl(p_sh[i], g_sh[i], rows[i], cols[i], vs[i], coef, found[i], h["lr"], h["wd"],
                 h["ls"], h["cgv"], h["beta"], 1e-30, 1e-3, h["ct"], rounding, seed, step,
                 grad_sq, ws[i], stage, global_rows, param.numel())
        for a, b in regions:  # the all-reduce (sum) of the header regions
            total = sum(w[a:b] for w in ws)
            for w in ws:
                w[a:b] = total
    new_state = {}
    if factored:
        new_state["exp_avg_sq_row"] = torch.cat(rows)
        new_state["exp_avg_sq_col"] = cols[0] if param.dim() == 2 else torch.cat(cols)
        if param.dim() == 2:
            for c in cols[1:]:  # every shard computed the same c
                assert torch.equal(c, cols[0])
    else:
        new_state["exp_avg_sq"] = torch.cat(vs)
    return torch.cat(p_sh), new_state, found
