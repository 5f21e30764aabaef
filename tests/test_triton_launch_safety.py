"""What the Triton launchers decide on the host, checked where the interpreter cannot reach.

* Index width: tensors of about 2**31 elements (4 GiB of bf16) cannot run in the interpreter.
  The launches are recorded on meta tensors (tests/triton_launches.py) and the kernel's own tile
  arithmetic (``_lomo_tile``: ``start = tile * BLOCK``, a full block when ``start + BLOCK <=
  numel - head``, else lanes ``local < numel - head - start``) is replayed in the integer width
  the launch chose (32 bits unless INDEX64): every tile must stay inside the tensor and the tiles
  must cover it exactly once.
* Multi-tensor staging: the host table is copied to the workspace on the workspace's device, and
  the event that guards the pinned staging buffer is recorded on that device's current stream
  (the stream the copy is queued on), whatever device is current for the caller.
"""

import inspect

import numpy as np
import pytest
import torch
from conftest import requires_triton
from triton_launches import capture

from lomo_kernels.triton_kernels import launch as launch_mod
from lomo_kernels.triton_kernels import lomo_update as lomo_mod

pytestmark = requires_triton


def _wrap(x, index64: bool):
    """x (int64 array) as the kernel's integers hold it: int64, or int32 with wrap-around."""
    if index64:
        return x
    return (x + 2**31) % 2**32 - 2**31


def _lomo_tiles(kernel, grid, args, kwargs):
    """[(first, stop)) element ranges each program of a recorded _lomo_update_kernel launch
    touches, computed as _lomo_tile computes them."""
    params = inspect.signature(kernel.fn).parameters
    bound = inspect.signature(kernel.fn).bind(
        *args, **{k: v for k, v in kwargs.items() if k in params}).arguments  # less num_warps
    numel, head = int(bound["numel"]), int(bound["head"])
    block, index64 = int(bound["BLOCK"]), bool(bound["INDEX64"])
    if not index64:  # 32-bit kernel arguments: Triton types a Python int >= 2**31 as int64
        assert numel < 2**31 and head < 2**31
    tile = np.arange(grid[0], dtype=np.int64)
    start = _wrap(tile * block, index64)
    body = _wrap(np.full_like(tile, numel - head), index64)
    full = _wrap(start + block, index64) <= body
    masked_lanes = np.clip(_wrap(body - start, index64), 0, block)
    lanes = np.where(full, block, masked_lanes)
    first = head + start  # the pointer arithmetic (pb = p_ptr + head + start) is 64-bit
    return numel, head, first, first + lanes


def _meta(numel, offset, dtype=torch.bfloat16):
    return torch.empty(numel + offset, dtype=dtype, device="meta")[offset:]


@pytest.mark.parametrize("numel", [2**31 - 1, 2**31 - 4095, 2**31 - 4096, 2**31 - 4097,
                                   2**31 - 2**13, 2**31 - 2**13 - 1, 2**31, 2**31 + 8,
                                   3 * 2**30 + 5])
@pytest.mark.parametrize("offset", [0, 3])
def test_lomo_tiles_stay_inside_the_tensor_near_2_pow_31(numel, offset):
    p = _meta(numel, offset)
    with capture() as seen:
        lomo_mod.lomo_update_(p, _meta(numel, offset), None, None, 1e-3, 0.0, 1.0, 0.0,
                              "nearest", 0, 1)
    (kernel, grid, args, kwargs), = seen
    n, head, first, stop = _lomo_tiles(kernel, grid, args, kwargs)
    assert n == numel and head == (5 if offset == 3 else 0)
    # no tile addresses memory before the body or past the end of the tensor
    assert first.min() >= head and stop.max() <= numel, (
        f"INDEX64={kwargs['INDEX64']}: a tile ends at element {stop.max()} of {numel}")
    # and the tiles cover the body exactly once, in order
    assert first[0] == head and np.array_equal(first[1:], stop[:-1]) and stop[-1] == numel


@pytest.mark.parametrize("numel, index64", [(2**31 - 2**12 - 8, False), (2**31 - 2**12 + 1, True),
                                            (2**31 - 1, True)])
def test_64_bit_indices_only_where_32_bits_would_wrap(numel, index64):
    # the largest tensors whose last tile ends below 2**31 keep the cheaper 32-bit offsets
    with capture() as seen:
        lomo_mod.lomo_update_(_meta(numel, 0), _meta(numel, 0), None, None, 1e-3, 0.0, 1.0, 0.0,
                              "nearest", 0, 1)
    (_, grid, _, kwargs), = seen
    assert kwargs["INDEX64"] == index64 == (grid[0] * kwargs["BLOCK"] >= 2**31)


# ---------------------------------------------------------------------------------------------
# Multi-tensor staging: stream and device of the copy and of its event
# ---------------------------------------------------------------------------------------------


class _FakeStream:
    def __init__(self, device):
        self.device = device

    def __eq__(self, other):
        return isinstance(other, _FakeStream) and other.device == self.device

    def __repr__(self):
        return f"stream of {self.device}"


class _FakeEvent:
    """Records the stream it is recorded on; CUDA's Event.record() without a stream records on
    the current stream of the CURRENT device."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.recorded = []

    def record(self, stream=None):
        if stream is None:
            stream = self.cuda.current_stream()
        self.recorded.append((stream, self.cuda.guarded))

    def query(self):
        return True


class _FakeCuda:
    """torch.cuda as the staging code sees it, with current device ``cuda:1`` while the
    workspace is on another device; ``guarded`` is the device a device guard made current."""

    def __init__(self):
        self.guarded = None

    def current_stream(self, device=None):
        if device is None:
            device = self.guarded if self.guarded is not None else "cuda:1"
        return _FakeStream(str(device))


def test_staging_event_on_the_workspace_device_stream(monkeypatch):
    fake = _FakeCuda()
    ws = torch.zeros(4096)

    class Guard:
        def __init__(self, t):
            self.device = str(t.device)

        def __enter__(self):
            fake.guarded = self.device

        def __exit__(self, *exc):
            fake.guarded = None

    monkeypatch.setattr(launch_mod, "device_guard", Guard)
    monkeypatch.setattr(torch.cuda, "current_stream", fake.current_stream)
    launch_mod._STAGING.clear()
    table = launch_mod.Table(ws, 2, 3)
    event = _FakeEvent(fake)
    table._st.event = event
    table.send()
    assert event.recorded == [(_FakeStream(str(ws.device)), str(ws.device))], (
        "the staging copy's event must be recorded, under the workspace's device guard, on that "
        f"device's current stream; got {event.recorded}")
    launch_mod._STAGING.clear()


def test_multi_launchers_send_the_table_under_the_device_guard(monkeypatch):
    # the table's copy and the launches share one guard: the copy is queued on the stream of
    # the parameters' device, which the kernels then wait for
    order = []

    class Guard:
        def __init__(self, t):
            pass

        def __enter__(self):
            order.append("enter")

        def __exit__(self, *exc):
            order.append("exit")

    sent = launch_mod.Table.send
    monkeypatch.setattr(launch_mod, "device_guard", Guard)
    monkeypatch.setattr(launch_mod.Table, "send", lambda self: (order.append("send"),
                                                                 sent(self)))
    ps = [torch.randn(5), torch.randn(3)]
    with capture():
        lomo_mod.lomo_update_multi_(ps, [torch.randn(5), torch.randn(3)], None, None, [0.1] * 2,
                                    [0.0] * 2, 1.0, [0.0] * 2, "nearest", [0] * 2, [1] * 2)
    assert "send" in order
    i = order.index("send")
    assert order[:i].count("enter") > order[:i].count("exit"), order
