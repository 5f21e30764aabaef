"""Keep the benchmark suite out of ordinary test runs.

``pytest tests/`` never collects this folder. A bare ``pytest`` from the repository root would,
so files here are ignored unless ``--benchmark-only`` is given or bench/ (or a file in it) is
named on the command line: ``pytest bench/ --benchmark-only``.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _named_on_command_line(config) -> bool:
    for arg in config.args:
        p = Path(str(arg).split("::")[0])
        p = (Path(config.invocation_params.dir) / p).resolve()
        if p == HERE or HERE in p.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    if collection_path.name == "conftest.py" or collection_path == HERE:
        return None
    if config.getoption("benchmark_only", default=False) or _named_on_command_line(config):
        return None
    return True
