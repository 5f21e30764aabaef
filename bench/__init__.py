"""lomo_kernels microbenchmarks (see bench/run.py). A package so that ``python bench/run.py``,
``python -m bench.run`` and ``pytest bench/ --benchmark-only`` all import ``bench.common``."""
