"""The counters of the SIMT emulation that runs the CUDA kernels on CPU tensors (backend
``cuda_emulated``, built with ``LOMO_KERNELS_CUDA_EMULATION=1``): how tests and benchmarks count
launches, blocks and threads without a GPU. Also reachable as ``lomo_kernels.ops.<name>``."""

from __future__ import annotations

from . import backends


def _emulation():
    status = backends.available_backends()["cuda_emulated"]
    if not status.startswith("loaded"):
        raise RuntimeError(f"lomo_kernels: cuda_emulated is {status}")
    return backends.native_extension()


def emulated_launch_count() -> int:
    """Kernel launches the CUDA emulation ran since the last ``reset_emulated_launch_count()``."""
    return _emulation().emulated_launch_count()


def reset_emulated_launch_count() -> None:
    _emulation().reset_emulated_launch_count()


def emulation_stats() -> dict:
    """The emulation's counters: launches, blocks, threads, context_switches, fibers."""
    return dict(_emulation().emulation_stats())
