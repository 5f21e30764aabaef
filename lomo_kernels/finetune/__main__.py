"""``python -m lomo_kernels.finetune``: bad input ends in one ``error: ...`` line, status 2."""

from .run import cli

raise SystemExit(cli())
