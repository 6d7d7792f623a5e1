"""Training objectives: one module each, registered here by name (see base.py)."""

from __future__ import annotations

from mlx_tune.objectives.base import Objective
from mlx_tune.objectives.sft import SFT

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (SFT,)}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}'; expected one of "
                         + ", ".join(sorted(OBJECTIVES)))
    return OBJECTIVES[name]
