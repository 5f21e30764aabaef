"""Triton kernels of lomo_kernels (installed as ``lomo_kernels.triton_kernels``)."""
raise ImportError("the Triton kernels are not written yet")
