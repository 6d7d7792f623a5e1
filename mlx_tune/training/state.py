"""What a checkpoint gives back to a run besides the model's arrays: the loop's counters,
the monitors that decide stops, the data position and Python's random state.

``restore`` reads it all back before the ``Trainer`` is built, so a checkpoint that does
not load is found (and the previous one tried) before the run's reporters exist, and the
Trainer receives its state whole in its constructor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlx_tune.backends.base import Backend
from mlx_tune.checkpoint.manager import CheckpointCorrupt
from mlx_tune.config.schema import Spec
from mlx_tune.training.monitors import EarlyStopping


@dataclass
class Interval:
    """Sums over the current report interval (checkpointed, so a resumed run reports
    exactly the numbers an uninterrupted one would)."""

    loss_sum: float = 0.0
    tokens: float = 0.0  # the loss's denominator (target tokens for sft, pairs...)
    steps: int = 0
    grad_norm: float = 0.0
    metrics: dict = field(default_factory=dict)  # the objective's: name -> [sum, count]


@dataclass
class LoopState:
    step: int = 0
    trained_tokens: int = 0
    interval: Interval = field(default_factory=Interval)
    first_val_loss: float | None = None
    last_val_loss: float | None = None
    last_checkpoint: str | None = None
    last_checkpoint_step: int = 0


@dataclass
class Progress:
    """The loop's counters and the monitors whose state a checkpoint keeps (memory growth
    is not one: it is about the process, training/memory.py)."""

    state: LoopState
    stopper: EarlyStopping

    @classmethod
    def fresh(cls, spec: Spec) -> Progress:
        return cls(LoopState(), EarlyStopping(spec.early_stopping))


def python_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    legacy = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [legacy[0], legacy[1].tolist(), *legacy[2:]]}


def restore_python_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def check_state(meta: dict) -> None:
    """Raise CheckpointCorrupt unless ``meta`` has the shape the Trainer writes: a
    checkpoint whose files verify but whose state is wrong is then skipped for the
    previous one, before anything is restored."""
    def need(obj: Any, key: str, types: tuple, where: str = "") -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise CheckpointCorrupt(f"state.json: '{where}{key}' is missing")
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise CheckpointCorrupt(f"state.json: '{where}{key}' is "
                                    f"{type(value).__name__}, expected "
                                    + " or ".join(t.__name__ for t in types))
        return value

    num, opt = (int, float), (int, float, type(None))
    need(meta, "step", (int,))
    need(meta, "trained_tokens", (int,))
    interval = need(meta, "interval", (dict,))
    for key in ("loss_sum", "tokens", "steps", "grad_norm"):
        need(interval, key, num, "interval.")
    need(meta, "first_val_loss", opt)
    need(meta, "last_val_loss", opt)
    for key in ("data", "early_stopping", "fingerprint", "backend"):
        need(meta, key, (dict,))
    rng = need(meta, "rng", (dict,))
    need(rng, "python", (list,), "rng.")
    need(rng, "numpy", (list,), "rng.")


def restore(spec: Spec, backend: Backend, data: Any, arrays: dict, meta: dict,
            path: str | None = None) -> Progress:
    """Load a checkpoint into the backend and the data stream, set Python's RNGs, and
    return the loop's progress for the Trainer."""
    # The backend gets back the meta its own state_dict() returned (the torch backend
    # reads which optimizer values were Python scalars from it).
    backend.load_state_dict(arrays, meta["backend"])
    progress = Progress.fresh(spec)
    s = progress.state
    s.step, s.trained_tokens = meta["step"], meta["trained_tokens"]
    s.interval = Interval(**meta["interval"])
    s.first_val_loss, s.last_val_loss = meta["first_val_loss"], meta["last_val_loss"]
    s.last_checkpoint, s.last_checkpoint_step = path, s.step
    data.train.load_state_dict(meta["data"])
    progress.stopper.load_state_dict(meta["early_stopping"])
    restore_python_rng(meta["rng"])
    return progress
