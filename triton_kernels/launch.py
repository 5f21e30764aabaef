"""Host side shared by the launchers: the one call that launches a kernel (tests count or stub
launches there), the device guard, per-call scratch for callers without a workspace, the packed
tables of the multi-tensor kernels, and ``launches``, the launch count of every op.

Multi-tensor tables. A multi-tensor kernel reads one record per tensor (addresses, sizes,
per-tensor scalars) and one entry per program (the tensor it works on). Gradients live at new
addresses every step, so the table is rebuilt every call: on the host, in a staging buffer (pinned
memory on CUDA), with numpy (no Python loop over scalars), then sent to the workspace with ONE
asynchronous host-to-device copy per call, whatever the number of tensors. The staging buffer and
the view of the workspace it is copied into are kept per (workspace, size), so a steady training
loop allocates nothing and creates no tensor per call. A CUDA event, recorded on the stream of the
workspace's device right after the copy, guards the staging buffer: if the previous copy out of it
has not run yet, the call stages in a fresh pinned buffer instead.
"""

import contextlib
import weakref

import numpy as np
import torch
import triton
import triton.language as tl

from ..reference import WS_HEADER

_NULL = contextlib.nullcontext()


def launch(kernel, grid, *args, **kwargs):
    """Every kernel launch of this package goes through here."""
    kernel[grid](*args, **kwargs)


def device_guard(t: torch.Tensor):
    """The CUDA device of ``t`` made current for the launch (a no-op when it already is)."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NULL


def scratch(workspace, data: int, tickets: int, like: torch.Tensor):
    """(workspace, first ticket slot): the caller's workspace, or a zero-filled float32 scratch
    allocated for this call. Tickets live at the END of the workspace, data from its start: a
    workspace reused by parameters of different shapes (different layouts) then never finds a
    stale value of one layout in a ticket of another (workspace_numel is the largest data plus
    the most tickets of its shapes)."""
    if workspace is None:
        workspace = torch.zeros(data + tickets, dtype=torch.float32, device=like.device)
    return workspace, workspace.numel() - tickets


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of Python ints (triton.cdiv is a jit function: slow on the host)."""
    return -(-a // b)


def peel(param: torch.Tensor, grad: torch.Tensor):
    """(head, aligned): the elements before the first 16-byte boundary of ``param`` when ``grad``
    is on a 16-byte boundary at the same element (same dtypes: the same misalignment; a float32
    ``grad`` of a 16-bit ``param`` or the reverse: both offsets checked), the kernel then moves
    the rest in 16-byte vectors; else (0, False). Fresh allocations are aligned: (0, True)."""
    pa, ga = param.data_ptr() % 16, grad.data_ptr() % 16
    ps, gs = param.element_size(), grad.element_size()
    head = ((16 - pa) % 16) // ps
    if pa % ps or ga % gs or (ga + head * gs) % 16:
        return 0, False
    return min(head, param.numel()), True


# ---------------------------------------------------------------------------------------------
# Multi-tensor tables
# ---------------------------------------------------------------------------------------------

# The most elements of a tensor that kernels index with 32-bit offsets only (every lane of its
# last tile, masked ones included, stays below 2**31)
MAX_SMALL = 2**31 - 2**13
REC = 24  # int32 slots per tensor record (a multiple of 4: records stay 16-byte aligned)
# slot of each field: int64 addresses (two slots), int32 sizes and keys, float32 scalars from F0
P_ADDR, G_ADDR, V_ADDR, NUMEL, HEAD, TILE0, KEY, F0 = 0, 2, 4, 6, 7, 8, 9, 12
NQ = 4  # partial sums per program of a multi-tensor kernel (at most)
_REC, _F0 = tl.constexpr(REC), tl.constexpr(F0)


def multi_layout(k: int, tiles: int):
    """float32 slot offsets, from the 16-byte aligned start of the multi-tensor region: records,
    tile table, per-tensor sums, per-tensor statistics (3 per tensor), partials (NQ per program);
    tickets (one per tensor and one for the launch) at the end of the workspace. The kernels'
    copy is multi_offsets."""
    tt = k * REC
    slots = tt + tiles
    stats = slots + k
    parts = stats + 3 * k
    return dict(tt=tt, slots=slots, stats=stats, parts=parts, end=parts + NQ * tiles)


@triton.jit
def multi_offsets(base, ntensors, ntiles):
    """(tile table, sums, statistics, partials): multi_layout on the device."""
    tt = base + ntensors * _REC
    slots = tt + ntiles
    stats = slots + ntensors
    return tt, slots, stats, stats + 3 * ntensors


@triton.jit
def record_fields(rec, DTYPE: tl.constexpr, GDTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """(param, grad pointers, numel, head, first tile, key) of the record at ``rec`` (a float32
    pointer into the workspace); the gradient is GDTYPE (DTYPE, or float32: an accumulation
    buffer of a 16-bit parameter)."""
    addr = rec.to(tl.pointer_type(tl.int64), bitcast=True)
    ints = rec.to(tl.pointer_type(tl.int32), bitcast=True)
    p = tl.load(addr).to(tl.pointer_type(DTYPE))
    g = tl.load(addr + 1).to(tl.pointer_type(GDTYPE))
    if ALIGNED:  # every address of the table is 16-byte aligned: vector accesses
        p = tl.multiple_of(p, 16)
        g = tl.multiple_of(g, 16)
    return (p, g, tl.load(ints + 6), tl.load(ints + 7), tl.load(ints + 8), tl.load(ints + 9))


@triton.jit
def tile_record(ws_ptr, base, ntensors, first_tile):
    """(global tile index, tensor index, record pointer) of this program."""
    gtile = first_tile + tl.program_id(0)
    t = tl.load(ws_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + base + ntensors * _REC
                + gtile)
    return gtile, t, ws_ptr + base + t * _REC


def multi_need(k: int, tiles: int):
    """(data, tickets) of a multi-tensor call: the header, 3 slots to align its region on 16
    bytes, the region; a ticket per tensor and one per launch."""
    return WS_HEADER + 3 + multi_layout(k, tiles)["end"], k + 1


def workspace_numel(needs) -> int:
    """float32 workspace elements for calls with these (data, tickets) needs: the largest data
    plus the most tickets (see ``scratch``)."""
    needs = list(needs)
    return max([d for d, _ in needs] + [WS_HEADER]) + max([t for _, t in needs] + [0])


_M32 = np.uint64(0xFFFFFFFF)


def _mix32(x):
    x = x & _M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _M32
    return x ^ (x >> np.uint64(16))


def rounding_keys(seed, step) -> np.ndarray:
    """reference.rounding_key of every (seed, step) pair, as int32 bit patterns."""
    seed = np.asarray(seed, dtype=np.int64).astype(np.uint64)
    step = np.asarray(step, dtype=np.int64).astype(np.uint64)
    return _mix32(seed ^ _mix32(step)).astype(np.uint32).view(np.int32)


def f32s(values) -> np.ndarray:
    """float64 -> float32 rounding of each value (reference.f32, vectorised)."""
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float64).astype(np.float32)


class _Staging:
    __slots__ = ("ws", "device", "dst", "host", "array", "event", "used")

    def __init__(self, ws, start, n):
        self.ws = weakref.ref(ws)
        self.device = ws.device
        self.dst = ws[start: start + n].view(torch.int32)
        self.host = torch.empty(n, dtype=torch.int32, pin_memory=ws.is_cuda)
        self.array = self.host.numpy()
        self.event = torch.cuda.Event() if ws.is_cuda else None
        self.used = False

    def busy(self) -> bool:
        return self.used and self.event is not None and not self.event.query()


# (workspace address, size, region) -> _Staging. An entry holds a view of its workspace: the
# cache is small and dropped whole when full (workspaces live as long as their optimizer).
_STAGING: dict = {}
_STAGING_MAX = 16


class Table:
    """The records and tile table of one multi-tensor call, filled in a staging buffer and sent
    to the workspace by ``send`` (one copy)."""

    def __init__(self, ws: torch.Tensor, k: int, tiles: int):
        self.base = WS_HEADER + (-(ws.data_ptr() // 4 + WS_HEADER)) % 4  # 16-byte aligned
        self.k, self.tiles = k, tiles
        n = k * REC + tiles  # records and tile table
        key = (ws.data_ptr(), ws.numel(), self.base, n)
        st = _STAGING.get(key)
        if st is None or st.ws() is not ws or st.busy():
            st = _Staging(ws, self.base, n)
            if len(_STAGING) >= _STAGING_MAX:
                _STAGING.clear()
            _STAGING[key] = st
        self._st = st
        self.records = st.array[: k * REC].reshape(k, REC)
        self.floats = self.records.view(np.float32)
        self.tile_table = st.array[k * REC:]

    def send(self):
        """One asynchronous copy of the table into the workspace. The copy is queued on the
        current stream of the workspace's device (made current here, as the launches that read
        the table make it), and the event that guards the staging buffer is recorded on that
        same stream: recorded on another device's stream it could complete before the copy, and
        the next call would refill the pinned buffer while the copy still reads it."""
        st = self._st
        with device_guard(st.dst):
            st.dst.copy_(st.host, non_blocking=True)
            if st.event is not None:
                st.event.record(torch.cuda.current_stream(st.device))
                st.used = True


def fill_records(table: Table, params, grads, block: int, seed, step, groups, exp_avg_sqs=None,
                 peel=True):
    """The per-tensor fields every multi-tensor kernel reads (addresses, numel, peeled head,
    first tile, stochastic-rounding key) and the tile table, its tiles ordered by launch group
    (``groups``: lists of list indices). Returns (tiles per tensor, first tile of each group,
    whether every tensor's body is 16-byte aligned). ``peel`` False: no head (the kernel does not
    peel), aligned when every address is."""
    k = len(params)
    rec = table.records
    r64 = rec.view(np.int64)
    pa = np.fromiter((p.data_ptr() for p in params), np.int64, k)
    ga = np.fromiter((g.data_ptr() for g in grads), np.int64, k)
    numel = np.fromiter((p.numel() for p in params), np.int64, k)
    if numel.max() >= MAX_SMALL:
        raise ValueError("multi-tensor ops take tensors of fewer than 2**31 - 2**13 elements")
    r64[:, P_ADDR // 2] = pa
    r64[:, G_ADDR // 2] = ga
    if exp_avg_sqs is not None:
        va = np.fromiter((v.data_ptr() for v in exp_avg_sqs), np.int64, k)
        r64[:, V_ADDR // 2] = va
    if peel:  # as peel(): both on a 16-byte boundary at the head's end
        ps = np.fromiter((p.element_size() for p in params), np.int64, k)
        gs = np.fromiter((g.element_size() for g in grads), np.int64, k)
        first = ((16 - pa % 16) % 16) // ps
        same = (pa % ps == 0) & (ga % gs == 0) & ((ga + first * gs) % 16 == 0)
        head = np.where(same, np.minimum(first, numel), 0)
    else:
        same = (pa % 16 == 0) & (ga % 16 == 0) & (va % 16 == 0 if exp_avg_sqs is not None else True)
        head = np.zeros(k, dtype=np.int64)
    tiles = np.maximum(1, -(-(numel - head) // block))
    order = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])
    starts = np.cumsum(tiles[order]) - tiles[order]
    rec[order, TILE0] = starts
    rec[:, NUMEL] = numel
    rec[:, HEAD] = head
    rec[:, KEY] = rounding_keys(seed, step)
    used = np.repeat(order.astype(np.int32), tiles[order])  # peeled heads: maybe fewer tiles
    table.tile_table[: used.size] = used
    firsts, n = [], 0
    for g in groups:
        firsts.append(int(starts[n]))
        n += len(g)
    return tiles, firsts, bool(same.all())


def group_by_dtype(params, grads):
    """Lists of list indices, one per (parameter dtype, gradient dtype) (in order of first
    appearance): one launch each."""
    first = (params[0].dtype, grads[0].dtype)
    if all((p.dtype, g.dtype) == first for p, g in zip(params, grads)):
        return [list(range(len(params)))]
    groups: dict = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        groups.setdefault((p.dtype, g.dtype), []).append(i)
    return list(groups.values())


def drop_empty(params, *lists):
    """``params`` and the per-tensor ``lists`` without the empty tensors (they take no part, as
    the single-tensor ops return at once on them)."""
    if all(p.numel() for p in params):
        return (params, *lists)
    keep = [i for i, p in enumerate(params) if p.numel()]
    return tuple([v[i] for i in keep] for v in (params, *lists))
