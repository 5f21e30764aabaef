"""bf16 linear layers computed in float32 tiles, for CPUs without a fast bf16 matrix product.

On a CPU without AVX-512 BF16 or AMX, torch's bf16 matrix product takes a slow path (on a 2-core
AVX2 EPYC, a 256 x 688 x 256 product: 77 ms in bf16, 0.6 ms in float32), so a bf16 model step
there measures that path, not the optimizer. ``patch()`` replaces ``torch.nn.functional.linear``
for bf16 CPU tensors with ``tiled_linear``: the weight is upcast a tile of rows at a time
(``TILE_BYTES`` of float32), each product accumulates in float32 and the result is rounded to bf16
once, as a GPU's bf16 matrix product does. What autograd saves is what ``F.linear`` saves (the bf16
input and weight), the weight's gradient is one bf16 tensor of the weight's shape, so memory
measurements keep their meaning; the extra transient memory is one float32 tile plus float32
copies of the input and of its gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

TILE_BYTES = 64 << 20


def _tile_rows(in_features: int) -> int:
    return max(1, TILE_BYTES // (4 * in_features))


class _TiledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        x32 = x.reshape(-1, x.shape[-1]).float()
        out = torch.empty(x32.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        step = _tile_rows(weight.shape[1])
        for r in range(0, weight.shape[0], step):
            out[:, r:r + step] = x32 @ weight[r:r + step].float().t()
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, weight.shape[0])
        x32 = x.reshape(-1, x.shape[-1]).float()
        need_x, need_w = ctx.needs_input_grad
        gx = torch.zeros_like(x32) if need_x else None
        gw = torch.empty_like(weight) if need_w else None
        step = _tile_rows(weight.shape[1])
        for r in range(0, weight.shape[0], step):
            g32 = g[:, r:r + step].float()
            if need_x:
                gx.addmm_(g32, weight[r:r + step].float())
            if need_w:
                gw[r:r + step] = g32.t() @ x32
        return (gx.to(x.dtype).reshape(x.shape) if need_x else None), gw


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear(x, weight, bias)`` for bf16 tensors, computed in float32 tiles."""
    out = _TiledLinear.apply(x, weight)
    return out if bias is None else out + bias


def patch() -> Callable[[], None]:
    """Route ``F.linear`` on bf16 CPU tensors through ``tiled_linear`` until the returned
    function is called."""
    original = F.linear

    def linear(x, weight, bias=None):
        if x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu":
            return tiled_linear(x, weight, bias)
        return original(x, weight, bias)

    F.linear = linear

    def undo() -> None:
        F.linear = original

    return undo
