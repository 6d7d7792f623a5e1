"""Training objectives, by name. Adding one = one module plus one line here.

The package imports neither mlx nor torch: losses compute through ``ArrayOps``, which
each backend supplies (``backends/<framework>/ops.py``).
"""

from __future__ import annotations

from mlx_tune.objectives.base import (ArrayOps, LossTerms, Objective, PreferenceSettings,
                                      RowLogps)
from mlx_tune.objectives.dpo import DPO
from mlx_tune.objectives.kto import KTO
from mlx_tune.objectives.orpo import ORPO
from mlx_tune.objectives.sft import SFT
from mlx_tune.objectives.simpo import SIMPO

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (SFT, DPO, ORPO, SIMPO, KTO)}


def get_objective(name: str) -> Objective:
    """The registered objective ``name``; an unknown name is refused by name."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"objective: unknown '{name}', expected one of "
                         f"{', '.join(OBJECTIVES)}") from None


__all__ = ["ArrayOps", "LossTerms", "Objective", "OBJECTIVES", "PreferenceSettings",
           "RowLogps", "get_objective"]
