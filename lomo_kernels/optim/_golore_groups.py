"""Param-group helpers of ``GoLore`` / ``GaLore``: the checks of their per-group options and
the groups of ``exclude`` (parameters trained at full rank)."""

from __future__ import annotations

import fnmatch
import warnings

import torch

from .._checks import number


def _check_betas(value, name):
    if (isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list))
            or len(value) != 2):
        raise TypeError(f"{name} must be a pair (beta1, beta2) of numbers in [0, 1), got {value!r}")
    for i, b in enumerate(value):
        if number(b, f"{name}[{i}]", ge=0.0) >= 1.0:
            raise ValueError(f"{name}[{i}] must be a number in [0, 1), got {b!r}")
    return tuple(value)


def _check_momentum(value, name):
    if number(value, name, ge=0.0) >= 1.0:
        raise ValueError(f"{name} must be a finite number in [0, 1), got {value!r}")
    return value


def _check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _split_excluded(params, exclude, names, who):
    """Param groups with the excluded parameters in groups of their own (``low_rank=False``)."""
    pats = [e for e in exclude if isinstance(e, str)]
    tensors = [e for e in exclude if isinstance(e, torch.Tensor)]
    if len(pats) + len(tensors) != len(exclude):
        raise TypeError(f"{who}: exclude takes parameters, names or name patterns")
    used = set()

    def excluded(p):
        hit = any(p is t for t in tensors)
        name = names.get(p)
        for pat in pats:
            if name is not None and (name == pat or fnmatch.fnmatchcase(name, pat)):
                used.add(pat)
                hit = True
        return hit

    groups = list(params)
    if not groups or not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out = []
    for grp in groups:
        ps = grp["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        flags = [excluded(p) for p in ps]
        opts = {k: v for k, v in grp.items() if k != "params"}
        keep = [p for p, f in zip(ps, flags) if not f]
        drop = [p for p, f in zip(ps, flags) if f]
        if keep:
            out.append({**opts, "params": keep})
        if drop:
            out.append({**opts, "params": drop, "low_rank": False})
    unused = [p for p in pats if p not in used]
    if unused:
        warnings.warn(f"{who}: exclude patterns {unused} match no parameter", UserWarning,
                      stacklevel=3)
    return out
