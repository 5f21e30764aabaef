"""@triton.jit helpers for deterministic reductions across the programs of one launch, without
floating-point atomics (docs/design.md):

* every program stores its partial result in the workspace;
* it then takes an integer ticket (``last_arrival``): the program that draws the last ticket sees
  every other program's partial and adds them in a fixed order (``sum_parts``), so the result is
  bitwise the same on every run, whatever order the programs ran in;
* the last program puts the ticket back to 0, so the workspace is ready for the next call.

A workspace slot is a float32; tickets are int32 stored in such slots (0.0 and 0 share their bits,
so a zero-filled workspace holds zero tickets).
"""

import triton
import triton.language as tl

# Partials added per step of ``sum_parts``: its reduction tree is a function of this constant and
# of the number of partials only, so two kernels that call it on the same partials agree bitwise.
PARTS = tl.constexpr(1024)


@triton.jit
def last_arrival(ws_ptr, slot, count):
    """True in exactly one of the ``count`` programs that call this on the ticket in workspace
    slot ``slot``: the last to arrive. Stores a program made before the call are visible to that
    program; it resets the ticket to 0."""
    tk_ptr = ws_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + slot
    tl.debug_barrier()  # every thread of this program has issued its stores
    drawn = tl.atomic_add(tk_ptr, 1, sem="acq_rel")
    last = drawn == count - 1
    if last:
        tl.store(tk_ptr, 0)
    return last


@triton.jit
def sum_parts(ptr, count, R: tl.constexpr):
    """sum(ptr[0:count]) in a fixed order: R lanes accumulate strided partials, then one tree.
    Loads bypass L1 (other programs wrote the values in this launch)."""
    acc = tl.full([R], 0, tl.float32)
    for start in range(0, count, R):
        i = start + tl.arange(0, R)
        acc += tl.load(ptr + i, mask=i < count, other=0.0, cache_modifier=".cg")
    return tl.sum(acc)


@triton.jit
def add_in_order(acc, ptr, count, CHUNK: tl.constexpr):
    """((acc + ptr[0]) + ptr[1]) + ... : the per-tensor sums added in list order, as a sequence of
    single-tensor calls would add them (CHUNK loads are issued before their additions)."""
    for start in range(0, count, CHUNK):
        for j in tl.static_range(CHUNK):
            ok = start + j < count
            x = tl.load(ptr + start + j, mask=ok, other=0.0, cache_modifier=".cg")
            acc = tl.where(ok, acc + x, acc)
    return acc
