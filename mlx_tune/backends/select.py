"""Choosing and constructing a backend by name ('auto' or a registered name).

Framework imports happen inside the registry's entries, so asking which backend to use
imports neither MLX nor torch unless that backend is the one built.
"""

from __future__ import annotations

from mlx_tune.backends import registry
from mlx_tune.backends.base import Backend
from mlx_tune.errors import SpecError


def select_backend(name: str) -> str:
    """'auto' -> the first registered backend whose framework imports (mlx wherever MLX
    does: Apple Silicon, MLX's Linux/CUDA builds; else torch); a registered name as it is;
    any other name is refused, naming the registered ones."""
    if name != "auto":
        return registry.get(name).name
    for entry in registry.BACKENDS.values():
        if entry.available():
            return entry.name
    raise SpecError("backend: auto found no framework to train with; install one of "
                    + ", ".join(e.framework for e in registry.BACKENDS.values()))


def make_backend(name: str) -> Backend:
    return registry.get(name).make()
