"""The subspace machinery of GoLore / GaLore (docs/spec.md "GoLore / GaLore"): which side a weight
is projected on, the projector refreshes (random Stiefel frames, top-r singular vectors), the
projection ``R = P^T G`` / ``G P`` into float32, and the moment transfer between subspaces.

Nothing here allocates a float32 copy of the gradient: every product with the (bf16/fp16/fp32)
gradient ``G`` is a GEMM with float32 output. On CUDA that is one GEMM with fp32 accumulation
(``torch.mm(..., out_dtype=torch.float32)``, reading the small factor in ``G``'s dtype); on the
CPU, which has no such GEMM (nor CUDA before torch 2.8), ``G`` is upcast in blocks of at most
``BLOCK_BYTES``.

Reproducibility: a refresh draws its random numbers from a generator on the parameter's device
seeded by ``projection_key(param_seed, refresh_index, stream)``; ``param_seed`` already folds the
optimizer seed with the parameter's ordinal, so the draws depend on (seed, parameter, refresh
index) only. (CPU and CUDA generators produce different streams: a run is reproducible on the
same kind of device.)
"""

from __future__ import annotations

import functools
import math

import torch

#: Largest float32 temporary (bytes) of a blocked product or of the SVD refresh's panels.
BLOCK_BYTES = 16 << 20
#: Subspace iterations of the SVD refresh (Halko, Martinsson & Tropp 2011, Alg. 4.4).
SVD_POWER_ITERS = 2
_M64 = (1 << 64) - 1
STREAM_STIEFEL, STREAM_SKETCH = 1, 2


SIDES = ("auto", "left", "right")


def side_of(m: int, n: int, choice: str = "auto") -> str:
    """The projected side of an m x n weight. ``"auto"``, GaLore's rule: the smaller dimension,
    ``"right"`` (m >= n): P is n x r, R = G P (m x r); ``"left"`` (m < n): P is m x r,
    R = P^T G (r x n). ``"left"`` / ``"right"``: that side, whatever the shape."""
    if choice != "auto":
        return choice
    return "right" if m >= n else "left"


def matrix_shape(shape, rank: int, low_rank: bool = True):
    """(m, n) = (shape[0], prod(shape[1:])) when a weight of ``shape`` is trained in a rank-
    ``rank`` subspace (``low_rank``, two or more dimensions, rank < min(m, n)), else None."""
    if not low_rank or len(shape) < 2:
        return None
    m, n = shape[0], math.prod(shape[1:])
    return (m, n) if rank < min(m, n) else None


def projected_shape(m: int, n: int, r: int, choice: str = "auto") -> tuple:
    return (m, r) if side_of(m, n, choice) == "right" else (r, n)


# ---------------------------------------------------------------------------------------------
# Keyed random streams
# ---------------------------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    # SplitMix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer.
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def projection_key(param_seed: int, index: int, stream: int) -> int:
    """63-bit generator seed of refresh ``index`` of a parameter (``param_seed``: the
    optimizer's per-parameter seed) for ``stream`` (the Stiefel draw or the SVD sketch)."""
    k = _splitmix64(param_seed & _M64)
    k = _splitmix64(k ^ (index & _M64))
    return _splitmix64(k ^ stream) >> 1


def _generator(device, key: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(key)
    return gen


def _orth(x: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of ``x`` with the signs of R's diagonal made positive, so Q is the
    unique orthonormal basis with those signs (Mezzadri 2007: with a Gaussian ``x`` this makes Q
    uniform on the Stiefel manifold; plain QR output is not)."""
    q, rq = torch.linalg.qr(x)
    d = torch.diagonal(rq)
    return q * torch.where(d < 0, -1.0, 1.0).to(q.dtype)


def random_projector(d: int, r: int, key: int, device) -> torch.Tensor:
    """GoLore: a float32 d x r frame uniform on the Stiefel manifold (QR of a Gaussian matrix,
    signs of R's diagonal fixed), drawn on ``device`` from the generator seeded by ``key``."""
    gen = _generator(device, key)
    z = torch.randn(d, r, generator=gen, device=device, dtype=torch.float32)
    return _orth(z)


# ---------------------------------------------------------------------------------------------
# Products with the gradient, float32 out, no float32 copy of the gradient
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _has_out_dtype_mm() -> bool:
    """torch.mm(..., out_dtype=torch.float32) on bf16/fp16 operands (CUDA, torch >= 2.8)."""
    try:
        x = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
        return torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _direct(t: torch.Tensor) -> bool:
    """True when a GEMM can read ``t`` as it is and accumulate into float32."""
    return t.dtype == torch.float32 or (t.is_cuda and _has_out_dtype_mm())


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 where one operand may be bf16/fp16. The large operand (the gradient or
    a panel of it) is read as it is where ``_direct``; elsewhere callers pass panels bounded by
    BLOCK_BYTES, which are upcast here."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    low = a.dtype if a.dtype != torch.float32 else b.dtype
    if a.is_cuda and _has_out_dtype_mm():
        return torch.mm(a.to(low), b.to(low), out_dtype=torch.float32)
    return a.float() @ b.float()


def _block_len(rows: int, cols: int, itemsize: int = 4) -> int:
    """How many of ``cols`` fit a float32 rows x block temporary of BLOCK_BYTES."""
    return max(1, min(cols, BLOCK_BYTES // max(1, rows * itemsize)))


def project(g: torch.Tensor, p: torch.Tensor, side: str) -> torch.Tensor:
    """R = P^T G (left, r x n) or G P (right, m x r), float32, as a new contiguous tensor."""
    m, n = g.shape
    if _direct(g):
        return _mm32(p.T, g) if side == "left" else _mm32(g, p)
    r = p.shape[1]
    step = _block_len(n, m)  # contiguous row blocks of G: fast upcasts
    if side == "left":  # R = sum over row blocks of P_i^T G_i
        out = torch.zeros(r, n, dtype=torch.float32, device=g.device)
        for i in range(0, m, step):
            out.addmm_(p[i:i + step].T, g[i:i + step].float())
    else:
        out = torch.empty(m, r, dtype=torch.float32, device=g.device)
        for i in range(0, m, step):
            torch.mm(g[i:i + step].float(), p, out=out[i:i + step])
    return out


def back_factors(n_mat: torch.Tensor, p: torch.Tensor, side: str, dtype):
    """(A, B) with back(N) = A @ B in ``dtype`` (the weight's): left P N, right N P^T."""
    a, b = (p, n_mat) if side == "left" else (n_mat, p.T)
    return (a, b) if dtype == torch.float32 else (a.to(dtype), b.to(dtype))


def back_into_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float,
               beta: float) -> torch.Tensor:
    """``out = beta * out + alpha * (a @ b)`` in place (``a``, ``b`` from ``back_factors``, in
    ``out``'s dtype): float32 accumulation, one rounding to ``out``'s dtype. One ``addmm_`` where
    the GEMM accumulates 16-bit operands in float32 at speed (CUDA) or ``out`` is float32; on the
    CPU a 16-bit ``out`` is made by blocks of rows from the operands upcast (exactly) to float32,
    each temporary at most ``BLOCK_BYTES`` and half of ``out``: torch's 16-bit CPU GEMM has no
    fast path on CPUs without bf16 instructions (~100x slower than float32 there)."""
    if out.dtype == torch.float32 or out.device.type != "cpu":
        return out.addmm_(a, b, beta=beta, alpha=alpha)
    b32 = b.float()
    # float32 blocks of at most BLOCK_BYTES and half of out's own bytes: a caller that makes out
    # by small blocks (the windowed apply) keeps its bound
    m, n = out.shape
    step = max(1, min(m, min(BLOCK_BYTES, out.numel() * out.element_size() // 2) // (4 * n)))
    for i in range(0, m, step):
        blk, a32 = out[i:i + step], a[i:i + step].float()
        if beta == 0.0:  # as addmm_: out's old values (NaN included) are not read
            blk.copy_(torch.mm(a32, b32).mul_(alpha))
        else:
            blk.copy_(torch.addmm(blk.float(), a32, b32, beta=beta, alpha=alpha))
    return out


# ---------------------------------------------------------------------------------------------
# The SVD refresh: top-r singular vectors on the projected side, with a bounded float32 spike
# ---------------------------------------------------------------------------------------------


def _panel_ranges(mat: torch.Tensor):
    """Column ranges of ``mat`` (d x e) whose float32 panels stay within BLOCK_BYTES."""
    d, e = mat.shape
    step = _block_len(d, e)
    return [(j, min(e, j + step)) for j in range(0, e, step)]


def _panel(mat: torch.Tensor, j0: int, j1: int) -> torch.Tensor:
    blk = mat[:, j0:j1]
    return blk if _direct(blk) else blk.float()


def svd_projector(g: torch.Tensor, r: int, side: str, key: int, oversample: int | None = None,
                  power_iters: int = SVD_POWER_ITERS) -> torch.Tensor:
    """GaLore: the top-``r`` singular vectors of ``g`` on the projected side (left singular
    vectors of ``M = g`` for "left", right ones, i.e. left ones of ``M = g^T``, for "right"),
    float32 d x r, d = the projected dimension.

    Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4): Q = orth(Gaussian
    d x k), k = min(d, r + oversample) (oversample defaults to r); ``power_iters + 1`` times
    Q = orth(M (M^T Q)); then B = Q^T M, whose left singular vectors come from the R factor of a
    TSQR of B^T = M^T Q accumulated panel by panel (no squaring of the condition number), and
    P = Q U_B[:, :r]. Every product with M runs over column panels of M, so the float32 working
    set is about (3 d k + 2 k^2) * 4 bytes plus BLOCK_BYTES * (1 + 2 k / d) (on the CPU one
    panel of M upcast; two panels of M^T Q): it grows with the projected dimension and k, never
    with the other dimension, and no float32 copy of ``g`` exists. When k == d, Q spans
    everything: the result is the exact top-r subspace (to float32 rounding), no iterations.
    """
    mat = g if side == "left" else g.T
    d, _ = mat.shape
    k = min(d, r + (r if oversample is None else oversample))
    gen = _generator(g.device, key)
    q = _orth(torch.randn(d, k, generator=gen, device=g.device, dtype=torch.float32))
    ranges = _panel_ranges(mat)
    if k < d:
        for _ in range(power_iters + 1):
            y = torch.zeros(d, k, dtype=torch.float32, device=g.device)
            for j0, j1 in ranges:
                blk = _panel(mat, j0, j1)
                y += _mm32(blk, _mm32(blk.T, q))
                del blk  # before the next panel exists
            q = _orth(y)
            del y
    rr = torch.zeros(0, k, dtype=torch.float32, device=g.device)
    for j0, j1 in ranges:
        blk = _panel(mat, j0, j1)
        z = _mm32(blk.T, q)  # a panel of B^T = M^T Q
        del blk
        rr = torch.linalg.qr(torch.cat([rr, z]), mode="r")[1]
    return _top_vectors(q, rr, r)


def _top_vectors(q: torch.Tensor, rr: torch.Tensor, r: int) -> torch.Tensor:
    """P = Q V_r from rr, the R factor of B^T = M^T Q: B = rr^T Q_t^T, so B's left singular
    vectors are rr's right singular vectors. Each vector's sign is fixed (its largest coordinate
    in Q's basis positive), so that computations of one subspace that differ only by rounding
    (one process, or the shards of ``svd_projector_sharded``) agree in sign too. The sign of a
    projector column changes no update: R, the moments and back(N) change sign with it, exactly."""
    _, _, vh = torch.linalg.svd(rr.double())
    v = vh[:r]
    v = v * torch.sign(v.gather(1, v.abs().argmax(dim=1, keepdim=True)))
    return q @ v.T.to(torch.float32)


def svd_projector_sharded(g: torch.Tensor, r: int, side: str, key: int, rows,
                          oversample: int | None = None,
                          power_iters: int = SVD_POWER_ITERS) -> torch.Tensor:
    """``svd_projector`` of a gradient whose rows are split across ranks, from this rank's rows
    ``g`` (m_s x n, possibly none): the same algorithm (the same Gaussian start Q, keyed alike,
    the same iterations), its products with M summed across the ranks, never a gather of the
    gradient. ``rows`` is the layout and its collectives: ``total`` (m), ``start`` (this
    rank's first row), ``sum_(t)`` (all-reduce sum in place), ``gather_rows(t)`` (the m x k
    matrix from every rank's m_s x k rows) and ``stack(t)`` (every rank's k x k ``t``, stacked).

    right (M = G^T, d = n; M's columns are G's rows): per iteration one all-reduce of
    Y = sum_s G_s^T (G_s Q) (n x k); then the R factor of B^T = G Q from each rank's
    ``qr(G_s Q)`` (one all-gather of k x k per rank) and a QR of the stack.
    left (M = G, d = m; M's rows are split): per iteration one all-reduce of Q^T G =
    sum_s Q_s^T G_s (k x n) and one all-gather of the rows G_s (G^T Q) (m x k in all); then one
    all-reduce of B = Q^T G and its R factor. Every rank ends with the same d x r projector."""
    m_s, n = g.shape
    d = n if side == "right" else rows.total
    k = min(d, r + (r if oversample is None else oversample))
    gen = _generator(g.device, key)
    q = _orth(torch.randn(d, k, generator=gen, device=g.device, dtype=torch.float32))
    if side == "right":
        if k < d:
            for _ in range(power_iters + 1):
                y = project(g, project(g, q, "right"), "left").T.contiguous()
                q = _orth(rows.sum_(y))
        rr = torch.linalg.qr(project(g, q, "right"), mode="r")[1]  # at most k x k
        pad = torch.zeros(k, k, dtype=torch.float32, device=g.device)
        pad[:rr.shape[0]] = rr
        rr = torch.linalg.qr(rows.stack(pad), mode="r")[1]
    else:
        mine = slice(rows.start, rows.start + m_s)
        if k < d:
            for _ in range(power_iters + 1):
                qtg = rows.sum_(project(g, q[mine], "left"))  # Q^T G, k x n
                q = _orth(rows.gather_rows(project(g, qtg.T, "right")))
        b = rows.sum_(project(g, q[mine], "left"))
        rr = torch.linalg.qr(b.T, mode="r")[1]
    return _top_vectors(q, rr, r)


# ---------------------------------------------------------------------------------------------
# Moment transfer
# ---------------------------------------------------------------------------------------------


def transfer(moment: torch.Tensor, p_old: torch.Tensor, p_new: torch.Tensor,
             side: str) -> torch.Tensor:
    """A first moment kept in the old subspace, expressed in the new one (GoLore's code):
    left ``M <- (P_new^T P_old) M``, right ``M <- M (P_old^T P_new)``. Out of place (r-sized),
    so that a failing update can restore the state entry."""
    if side == "left":
        return (p_new.T @ p_old) @ moment
    return moment @ (p_old.T @ p_new)
