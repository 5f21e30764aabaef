"""lomo_kernels benchmarks (see bench/README.md). A package so that ``python bench/run.py``,
``python -m bench.run`` and ``pytest bench/ --benchmark-only`` share its modules: shapes, timing,
memprobe, environment, results, report, microbench, optimizers."""
