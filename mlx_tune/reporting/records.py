"""What the loop tells the outside world, and the fan-out that delivers it.

The loop builds plain-Python records (``TrainReport``, ``EvalReport``) at its report
interval and hands them to a ``Reporters`` list. Reporters never see framework arrays,
so nothing here can force a host sync. Concrete reporters live in:

- ``mlx_tune.reporting.text``  -- ``PlainReporter`` (one line per report), ``JsonlReporter``
- ``mlx_tune.reporting.tensorboard``         -- ``TensorBoardReporter``
- ``mlx_tune.reporting.wandb_reporter``      -- ``WandbReporter`` (optional ``[wandb]`` extra)
- ``mlx_tune.reporting.dashboard``  -- ``RichDashboard`` (rich live view)

They are imported lazily (``make_reporters`` and module ``__getattr__``) so that a plain
run never imports rich's live machinery and a run without TensorBoard never imports
tensorboardX (nor one without wandb, wandb).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from mlx_tune.errors import first_line

LEVELS = ("debug", "info", "warning", "error")


@dataclass
class TrainReport:
    step: int
    total_steps: int
    epoch: int
    loss: float  # mean loss of the last report interval
    loss_avg: float  # moving average of the last `loss_window` finite step losses
    loss_window: int  # early_stopping.loss_window: the steps loss_avg spans
    loss_trend: float  # negative = improving
    learning_rate: float
    grad_norm: float
    tokens_per_second: float
    steps_per_second: float
    eta_seconds: float | None
    trained_tokens: int
    memory_mb: float  # active: what live arrays hold
    peak_memory_mb: float
    memory_delta_mb: float  # growth of the footprint since its baseline (training/memory.py)
    leak_warning: bool
    steps_since_checkpoint: int
    last_checkpoint: str | None
    skipped_steps: int
    early_stopping: dict[str, int]  # EarlyStopping.counters(): {"plateau_counter": 1, ...}
    compiled_shapes: int = 0  # distinct input shapes the backend's compiled step has seen
    shape_bound: int = 0  # how many it should see at most (the run's widths); 0 = unknown
    cache_memory_mb: float = 0.0  # freed buffers the allocator keeps (MLX cache, torch reserved)
    resident_mb: float | None = None  # the process's resident set (OS); None where unknown
    # The objective's metrics over the interval (e.g. "rewards/accuracies"), each its sum
    # over the interval divided by its own count. Reporters write them by name, generically.
    metrics: dict[str, float] = field(default_factory=dict)
    wall_time: float = field(default_factory=time.time)


@dataclass
class EvalReport:
    step: int
    val_loss: float
    # Everything else the evaluation measured, by name (sft: perplexity, accuracy,
    # confidence, entropy; a preference objective: its rewards/... and logps/... metrics).
    metrics: dict[str, float]
    best_val_loss: float
    best_step: int
    is_best: bool
    seconds: float
    samples: list[dict] = field(default_factory=list)  # {"prompt", "text", "metrics": {name: float}}


@runtime_checkable
class Reporter(Protocol):
    """Every reporter implements all of these (no-ops allowed). Records handed in are
    owned by the reporter afterwards: the loop builds a fresh one per report and never
    mutates it, which is what lets the dashboard render from another thread."""

    def on_start(self, info: dict) -> None: ...
    def on_train(self, r: TrainReport) -> None: ...
    def on_eval(self, r: EvalReport) -> None: ...
    def on_checkpoint(self, step: int, path: str) -> None: ...
    def on_message(self, text: str, level: str = "info") -> None: ...
    def on_stop(self, reason: str, exit_code: int) -> None: ...
    def close(self) -> None: ...


class NullReporter:
    """No-op base: concrete reporters override only what they need."""

    def on_start(self, info: dict) -> None:
        pass

    def on_train(self, r: TrainReport) -> None:
        pass

    def on_eval(self, r: EvalReport) -> None:
        pass

    def on_checkpoint(self, step: int, path: str) -> None:
        pass

    def on_message(self, text: str, level: str = "info") -> None:
        pass

    def on_stop(self, reason: str, exit_code: int) -> None:
        pass

    def on_test(self, score: Any) -> None:  # training/testset.py TestResult
        pass

    def close(self) -> None:
        pass


def exception_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (just ``Type`` when it has none)."""
    first, kind = first_line(exc), type(exc).__name__
    return kind if first == kind else f"{kind}: {first}"


class Reporters(list):
    """Fan-out: calls each reporter in turn.

    A failing reporter (full disk under tensorboard/, a closed terminal) must not kill an
    unattended multi-hour run, so exceptions are caught per reporter and call; the first
    failure of each (reporter, method) is announced loudly to the *other* reporters and
    stderr, later ones are silent. KeyboardInterrupt and SystemExit still propagate.
    """

    def __init__(self, reporters: Any = ()) -> None:
        super().__init__(reporters)
        self._failed: set[tuple[int, str]] = set()

    def _call(self, method: str, *args: Any) -> None:
        for rep in list(self):
            try:
                getattr(rep, method)(*args)
            except Exception as exc:  # noqa: BLE001 -- see class docstring
                self._failure(rep, method, exc)

    def _failure(self, rep: Any, method: str, exc: BaseException) -> None:
        key = (id(rep), method)
        if key in self._failed:
            return
        self._failed.add(key)
        name = getattr(rep, "label", type(rep).__name__)
        text = f"reporter {name}.{method} failed (further failures silenced): {exception_line(exc)}"
        print(text, file=sys.stderr, flush=True)
        for other in list(self):
            if other is rep:
                continue
            try:
                other.on_message(text, "error")
            except Exception:  # noqa: BLE001 -- never recurse into failure handling
                pass

    def on_start(self, info: dict) -> None:
        self._call("on_start", info)

    def on_train(self, r: TrainReport) -> None:
        self._call("on_train", r)

    def on_eval(self, r: EvalReport) -> None:
        self._call("on_eval", r)

    def on_checkpoint(self, step: int, path: str) -> None:
        self._call("on_checkpoint", step, str(path))

    def on_message(self, text: str, level: str = "info") -> None:
        self._call("on_message", text, level)

    def on_stop(self, reason: str, exit_code: int) -> None:
        self._call("on_stop", reason, exit_code)

    def on_test(self, score: Any) -> None:
        # Reporters written before test scores existed simply do not have the method.
        for rep in list(self):
            if hasattr(rep, "on_test"):
                try:
                    rep.on_test(score)
                except Exception as exc:  # noqa: BLE001 -- see class docstring
                    self._failure(rep, "on_test", exc)

    def close(self) -> None:
        self._call("close")
