"""``GoLore`` / ``GaLore``: subspace optimizers fused into the backward pass.

GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection") keeps the optimizer state of a weight W (m x n) in an r-dimensional subspace of its
gradient: R = P^T G (or G P), an inner optimizer (Adam or momentum SGD) on R, and the update
projected back, ``W -= lr * scale * back(N)``; P holds the top-r singular vectors of the gradient,
refreshed every T steps. GoLore (He et al. 2024, "Subspace Optimization for Large Language Models
with Convergence Guarantees", arXiv 2410.11289) shows GaLore need not converge with small-batch
gradients (the SVD then picks noise directions) and draws P uniformly from the Stiefel manifold
instead, which provably converges. docs/spec.md "GoLore / GaLore" has the formulas.

Each weight is updated inside its post-accumulate-grad hook (the machinery of ``Lomo``):

    refresh P when due                      (random: QR of a keyed Gaussian; svd: svd_projector)
    R = P^T G  or  G P                      (one GEMM, float32 out; G never copied to float32)
    golore_update_(R, moments)              (one fused element-wise kernel: N written into R)
    W = W * (1 - lr * wd) - lr*scale*back(N) (one GEMM accumulating into W, see _apply)

so the only weight-sized memory is the weight and its gradient, as for LOMO.
"""

from __future__ import annotations

import math

import torch

from .. import ops
from .._checks import choice, integer, number
from . import _batch, _golore_shards
from . import projector as proj
from ._base import InBackwardOptimizer
from ._golore_groups import _check_betas, _check_bool, _check_momentum, _split_excluded
from ._subspace_window import SubspaceAccumulationMixin

PROJECTIONS = ("random", "svd")


# A window's update (no gradient left) makes U by this many blocks of rows: its scratch is 1/16 of
# the weight, below the 1/8 the accumulation tests allow beside the buffers.
_APPLY_CHUNKS = 16


class GoLore(SubspaceAccumulationMixin, InBackwardOptimizer):
    """GoLore (``projection="random"``) and GaLore (``projection="svd"``), in the backward pass.

    model: an ``nn.Module`` (its trainable parameters) or an iterable of parameters / param
        groups. Every argument below except ``exclude``, ``clip_grad_norm``, ``backend``,
        ``rounding`` and ``seed`` is also a per-group option.
    lr: learning rate (default 1e-3), read from ``param_groups`` at every update.
    rank: subspace dimension r (> 0). A weight with ``min(m, n) <= rank`` is trained at full rank.
    update_proj_gap: T, the projector is refreshed at this parameter's updates 0, T, 2T, ...
    scale: the back-projected update is multiplied by it (GaLore's alpha; default 0.25).
    side: the projected side, ``"auto"`` (GaLore's rule: the smaller dimension), ``"right"``
        (P n x r, R = G P) or ``"left"`` (P m x r, R = P^T G). On FSDP2 shards (rows split)
        ``"right"`` is local to each rank; ``"left"`` all-reduces R (r x n) every step.
    projection: ``"random"`` (GoLore: uniform on the Stiefel manifold) or ``"svd"`` (GaLore:
        top-r singular vectors of the current gradient).
    svd_steps: K; with ``projection="random"`` the first K updates use SVD projections, the
        rest random ones (GoLore's recipe, its ``rand_ratio``: ``svd_steps = rand_ratio *
        total_steps``).
    inner: ``"adamw"`` (bias-corrected Adam moments, decoupled weight decay) or ``"sgd"``
        (momentum SGD; ``momentum=0`` is plain SGD and keeps no state).
    betas, eps: Adam's; momentum: SGD's.
    weight_decay: decoupled, ``W *= 1 - lr * weight_decay`` (full rank, not projected).
    exclude: parameters, names or ``fnmatch`` patterns of names (``"*embed_tokens*"``) trained at
        full rank by the inner optimizer (they are put in groups of their own with
        ``low_rank=False``). Parameters with fewer than two dimensions always are.
    clip_grad_norm: global L2-norm clipping through ``grad_norm(loss)`` before every
        ``fused_backward`` (two backward passes; without it the backward is refused before
        anything changes), as ``AdaLomo``; None: off.
    clip_mode: ``"exact"`` (those two passes) or ``"previous"`` (one backward, clipped with the
        previous step's global norm), as ``Lomo``.
    backend: ``"auto"``, ``"native"``, ``"triton"`` or ``"torch"`` for the fused inner update.
    rounding: of bf16/fp16 weights (see ``_apply``): None (default) is ``"stochastic"``;
        ``"nearest"`` rounds to nearest, as lomo-optim does; as ``Lomo``.
    seed: keys the random projections (with the parameter's ordinal and the refresh index) and
        stochastic rounding.
    accumulation_steps: K (default 1); with K > 1 each backward accumulates and ``step()`` (also
        called by the K-th ``fused_backward``) updates once from the sum. A low-rank weight
        accumulates its projected gradient R (float32, the size of one moment: the projection is
        linear, so the sum is exact) and its gradient is freed in the hook; the projector due
        at the window's update is drawn at the window's first gradient (GaLore's SVD: from
        that micro-batch's gradient). With ``clip_grad_norm`` in the exact mode the norm of the
        whole accumulated gradient is needed, which R does not give: low-rank weights then keep
        a full buffer as ``AdaLomo`` does (docs/accumulation.md). ``accumulation_dtype`` as
        ``Lomo`` (for full buffers; R is float32).

    Weights of more than two dimensions are treated as ``shape[0] x prod(shape[1:])`` matrices.

    FSDP2 (``fully_shard``, ``Shard(0)``): the same updates as one process on the global batch
    (docs/golore.md); the state is DTensors from construction, for torch.distributed.checkpoint.
    ``independent_ranks`` as for ``Lomo``.

    State per low-rank weight (``self.state[p]``): ``step`` (updates so far), ``projector`` P
    (float32, min(m, n) x r), ``refreshes`` (projectors drawn so far: the position of the random
    stream), ``next_refresh`` (the 0-based update at which the next refresh is due), and the
    float32 moments of R's shape (max(m, n) x r): ``exp_avg`` and ``exp_avg_sq`` (adamw) or
    ``momentum_buffer`` (sgd with momentum). Full-rank parameters: ``step`` and the moments of
    the parameter's shape.

    Non-finite gradients: the weight and its moments are left as they were, the device flag is
    set and ``NonFiniteGradientWarning`` is emitted after the backward (as ``Lomo``/``AdaLomo``);
    ``step`` still counts the update (as ``AdaLomo``), a random refresh due at that update still
    happens (it does not depend on the gradient) and an SVD refresh waits for the next finite
    gradient.
    """

    _name = "GoLore"
    _op = "golore_update_"
    _shardable = True  # _golore_shards.py: local right projections, all-reduced left ones

    def __init__(
        self,
        model,
        lr=1e-3,
        *,
        rank=128,
        update_proj_gap=200,
        scale=0.25,
        side="auto",
        projection="random",
        svd_steps=0,
        inner="adamw",
        betas=(0.9, 0.999),
        eps=1e-8,
        momentum=0.0,
        weight_decay=0.0,
        exclude=(),
        clip_grad_norm=None,
        backend="auto",
        rounding=None,
        seed=0,
        clip_mode="exact",
        independent_ranks=False,
        accumulation_steps=1,
        accumulation_dtype="float32",
    ):
        defaults = dict(
            lr=lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale, side=side,
            projection=projection, svd_steps=svd_steps, inner=inner, betas=betas, eps=eps,
            momentum=momentum, weight_decay=weight_decay, low_rank=True,
        )
        module = model if isinstance(model, torch.nn.Module) else None
        if exclude:
            if module is not None:
                names = {p: n for n, p in module.named_parameters()}
                params = [p for p in module.parameters() if p.requires_grad]
            elif any(isinstance(e, str) for e in exclude):
                raise ValueError(f"{self._name}: exclude by name needs an nn.Module as model")
            else:
                names, params = {}, model
            model = _split_excluded(params, exclude, names, self._name)
        super().__init__(
            model, defaults, clip_grad_norm=clip_grad_norm, backend=backend, rounding=rounding,
            seed=seed, clip_mode=clip_mode, independent_ranks=independent_ranks,
            accumulation_steps=accumulation_steps, accumulation_dtype=accumulation_dtype,
        )
        if module is not None:  # names for messages, also when exclude made the groups
            self.model = module
            self._names = {p: n for n, p in module.named_parameters()}

    # ------------------------------------------------------------------ validation
    def _group_rules(self):
        """Checks of every per-group option (the base class runs them on the constructor's
        arguments, on every added group and before every backward)."""
        return {
            **super()._group_rules(),
            "rank": lambda v, n: integer(v, n, ge=1),
            "update_proj_gap": lambda v, n: integer(v, n, ge=1),
            "scale": lambda v, n: number(v, n),
            "side": lambda v, n: choice(v, n, proj.SIDES),
            "projection": lambda v, n: choice(v, n, PROJECTIONS),
            "svd_steps": lambda v, n: integer(v, n, ge=0),
            "inner": lambda v, n: choice(v, n, ops.INNERS),
            "betas": _check_betas,
            "eps": lambda v, n: number(v, n, ge=0.0),
            "momentum": _check_momentum,
            "low_rank": _check_bool,
        }

    # ------------------------------------------------------------------ the update
    @staticmethod
    def _matrix_shape(p, group):
        """(m, n) when ``p`` is trained in a subspace, else None (full rank)."""
        return proj.matrix_shape(tuple(p.shape), group["rank"], group["low_rank"])

    @staticmethod
    def _state_names(group):
        return ops.golore_state_names(group["inner"], float(group["momentum"]))

    def _init_state(self, p, group, state, mn) -> None:
        names = self._state_names(group)
        shape = p.shape if mn is None else proj.projected_shape(*mn, group["rank"], group["side"])
        state["step"] = 0
        if mn is not None:
            state["projector"] = None
            state["refreshes"] = 0
            state["next_refresh"] = 0
        for name in names:
            state[name] = torch.zeros(shape, dtype=torch.float32, device=p.device)

    def _kernel_adds_grad_sq(self, device) -> bool:
        return True  # _update adds it, before _apply reuses the gradient's buffer

    def _update(self, p, g, group, state, seed) -> None:
        _batch.add_grad_sq(self._grad_sq(p), g, self._active_scale)
        mn = self._matrix_shape(p, group)
        if not state:
            self._init_state(p, group, state, mn)
        state["step"] += 1
        found = self._device_flag(p.device)
        if mn is None:  # full rank: the whole update in one fused kernel
            self._inner(g, p, group, state, found, seed, float(group["lr"]),
                        float(group["weight_decay"]))
            return
        if p.dim() != 2:
            p, g = p.view(mn), g.view(mn)
        side = proj.side_of(*mn, group["side"])
        if state["step"] - 1 >= state["next_refresh"] and not self._refresh(g, group, state,
                                                                              side, seed, mn):
            if state["projector"] is None:  # no subspace yet and a non-finite gradient
                found.fill_(1.0)
                return
        pmat = state["projector"]
        r = proj.project(g, pmat, side)
        self._inner(r, None, group, state, found, seed, 0.0, 0.0)
        self._apply(p, g, r, pmat, side, group, state, seed, found)

    def _inner(self, r, param, group, state, found, seed, lr, weight_decay) -> None:
        """The fused inner update: N into ``r`` (param None) or the full-rank update of param."""
        b1, b2 = group["betas"]
        self._impl(r.device)(
            r, param, state.get("exp_avg"), state.get("exp_avg_sq"), state.get("momentum_buffer"),
            self._clip_coef_on(r.device), found, group["inner"], lr, weight_decay, 1.0,
            float(b1), float(b2), float(group["eps"]), float(group["momentum"]),
            self._rounding_for(r.dtype if param is None else param.dtype),
            seed, state["step"],
        )

    def _update_sharded(self, p, g, group, state, seed, shard) -> None:
        _golore_shards.update(self, p, g, group, state, seed, shard, self._pname(p))

    def _sharded_state(self, shard):
        # the parameter and its group (the state's shapes depend on rank, side, inner)
        p = next(q for q, s in self._sharding.shards.items() if s is shard)
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        _golore_shards.Rows(shard, self._pname(p), self._name)  # the torch.chunk row layout
        return _golore_shards.fresh_state(shard, group, self._state_names(group))

    def _configure(self) -> None:
        self._sharding.keyed = True  # every rank must give a parameter the same ordinal

    def _refresh(self, g2, group, state, side, seed, mn, rows=None, t0=None) -> bool:
        """Draw the projector due at this update (``t0``: the 0-based update it is for; default:
        the update running now); False when an SVD refresh must wait for a
        finite gradient. ``rows``: the shard layout when ``g2`` holds this rank's rows of the
        gradient (``_golore_shards.Rows``), else None. The first moment (exp_avg / momentum_buffer) is carried into the new
        subspace as GoLore's code does; Adam's second moment is kept coordinate-wise, also as
        GoLore's code does: a linear transfer of v (docs/spec.md writes one for "M") makes
        entries negative (sqrt -> NaN), and the positive transfer (P_new^T P_old)**2 v shrinks v
        by ~r/d for an unrelated random subspace: once m has rebuilt, updates are then up to
        ~sqrt(d/r) times too large until v has re-accumulated (~1 / (1 - beta2) steps)."""
        t0 = state["step"] - 1 if t0 is None else t0
        use_svd = group["projection"] == "svd" or t0 < group["svd_steps"]
        idx = state["refreshes"]
        if use_svd:
            # An SVD of a non-finite gradient is meaningless. SVDs synchronise with the host
            # anyway, so this look costs nothing extra.
            if rows is not None:
                if bool(rows.nonfinite(g2)):  # agreed: every rank skips the refresh alike
                    return False
            else:
                lo, hi = torch.aminmax(g2)  # a reduction: no temporary of g's size
                if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                    return False
            key = proj.projection_key(seed, idx, proj.STREAM_SKETCH)
            new = (proj.svd_projector(g2, group["rank"], side, key) if rows is None else
                   proj.svd_projector_sharded(g2, group["rank"], side, key, rows))
        else:
            d = mn[1] if side == "right" else mn[0]
            new = proj.random_projector(d, group["rank"],
                                        proj.projection_key(seed, idx, proj.STREAM_STIEFEL),
                                        g2.device)
        old = state["projector"]
        if old is not None:
            for name in ("exp_avg", "momentum_buffer"):
                if name in state:
                    state[name] = proj.transfer(state[name], old, new, side)
        state["projector"] = new
        state["refreshes"] = idx + 1
        gap = group["update_proj_gap"]
        state["next_refresh"] = (t0 // gap + 1) * gap
        return True

    def _apply(self, w, g2, n_mat, pmat, side, group, state, seed, found) -> None:
        """W = W * (1 - lr * wd) - lr * scale * back(N), in place, from N (``n_mat``; all NaN
        when the gradient was not finite).

        Weight decay 0 with nearest rounding (or a float32 weight): one product into W
        (``projector.back_into_``: beta = 1, alpha = -lr * scale, fp32 accumulation, one rounding
        to W's dtype); a NaN N is zeroed first, so a non-finite gradient adds exactly nothing.
        Otherwise the gradient's own buffer (dead once R is computed) receives
        U = lr * scale * back(N) (one GEMM, rounded to W's dtype) and the fused LOMO kernel
        applies ``W = round(W * (1 - lr * wd) - U)``: element-wise non-finite guard (a NaN N
        leaves W untouched, decay included, with no host synchronisation) and, for
        ``rounding="stochastic"``, the same (seed, step, element) hash as every other update, so
        updates far below W's resolution survive in expectation. Rounding U to W's dtype first
        costs a relative 2**-9 of the update (bf16), not of W.
        """
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        alpha = lr * float(group["scale"])
        stochastic = self._rounding_for(w.dtype) == "stochastic"
        if wd == 0.0 and not stochastic:
            n_mat.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
            proj.back_into_(w, *proj.back_factors(n_mat, pmat, side, w.dtype), alpha=-alpha,
                            beta=1.0)
            return
        a, b = proj.back_factors(n_mat, pmat, side, w.dtype if g2 is None else g2.dtype)
        if g2 is not None:  # (a float32 accumulation buffer of a 16-bit weight keeps U in float32)
            proj.back_into_(g2, a, b, alpha=alpha, beta=0.0)
            self._lomo(w, g2, found, lr * wd, seed, state["step"])
            return
        # Accumulated in the subspace: no gradient is left, and a weight-sized scratch would undo
        # the point of rank-r buffers. U is made and applied by blocks of rows (W's rows are
        # A's rows), each scratch 1/_APPLY_CHUNKS of W; block c > 0 draws its rounding bits
        # from its own seed (the hash indexes elements within one call).
        rows = w.shape[0]
        block = -(-rows // _APPLY_CHUNKS)  # ceil: 1 <= block <= rows
        scratch = torch.empty((block, w.shape[1]), dtype=w.dtype, device=w.device)
        for c, r0 in enumerate(range(0, rows, block)):
            u = scratch[: min(block, rows - r0)]
            proj.back_into_(u, a[r0:r0 + u.shape[0]], b, alpha=alpha, beta=0.0)
            self._lomo(w[r0:r0 + u.shape[0]], u, found, lr * wd,
                       (seed + c * 0x9E3779B9) & 0xFFFFFFFF, state["step"])

    def _lomo(self, w, u, found, decay, seed, step) -> None:
        """W = round(W * (1 - decay) - U) with the fused LOMO kernel (non-finite guard, rounding)."""
        self._lomo_impl(w.device)(w, u, None, found, 1.0, decay, 1.0, 0.0,
                                  self._rounding_for(w.dtype), seed, step)

    def _lomo_impl(self, device):
        key = ("lomo_update_", device)
        impl = self._impls.get(key)
        if impl is None:
            impl = self._impls[key] = ops.get_impl("lomo_update_", self.backend, device)
        return impl

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                mn = self._matrix_shape(p, group)
                need = set(self._state_names(group))
                have = {k for k in ("exp_avg", "exp_avg_sq", "momentum_buffer") if k in st}
                if need != have or (mn is None) == ("projector" in st):
                    raise ValueError(
                        f"{self._name}: the saved state of parameter {self._pname(p)} does not "
                        f"match this optimizer's options (inner={group['inner']!r}, "
                        f"momentum={group['momentum']}, rank={group['rank']})")


class GaLore(GoLore):
    """GaLore in the backward pass: ``GoLore`` with ``projection="svd"`` (top-r singular vectors
    of the current gradient at every refresh). Same arguments."""

    _name = "GaLore"

    def __init__(self, model, lr=1e-3, *, projection="svd", **kwargs):
        super().__init__(model, lr, projection=projection, **kwargs)
