"""``python -m lomo_kernels``: the installation doctor (lomo_kernels/doctor.py)."""

from .doctor import main

raise SystemExit(main())
