"""The objective seam: what a training objective sees and returns, framework-neutral.

A backend's step computes, for every row of the forward batch, the sum of the
log-probabilities of the row's target (completion) tokens (``RowLogps``), and hands them
to the objective's ``loss`` with the backend's ``ArrayOps``. The objective returns sums,
never means (``LossTerms``), so gradients and metrics add up exactly across
micro-batches and ranks; the step divides once, by the step's total ``count``.

Nothing here imports mlx or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol


@dataclass
class RowLogps:
    """One entry per row of the forward batch (framework arrays of shape [R])."""

    logps: Any  # sum over the row's target tokens of log p(token)
    tokens: Any  # how many target tokens the row has (float)
    smooth: Any = None  # sum over those tokens of mean_k log p(k) (label smoothing only)


@dataclass
class LossTerms:
    """Sums over the examples of one micro-batch."""

    loss_sum: Any  # scalar: the loss summed over examples (or tokens), never a mean
    count: Any  # scalar: its denominator (target tokens for SFT, pairs, examples)
    metrics: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (sum, count)


class ArrayOps(Protocol):
    """The elementwise and reduction ops a loss needs, on a backend's arrays."""

    def log_sigmoid(self, x: Any) -> Any: ...
    def sigmoid(self, x: Any) -> Any: ...
    def relu(self, x: Any) -> Any: ...
    def exp(self, x: Any) -> Any: ...
    def log(self, x: Any) -> Any: ...
    def log1p(self, x: Any) -> Any: ...
    def clip(self, x: Any, low: Optional[float], high: Optional[float]) -> Any: ...
    def where(self, cond: Any, a: Any, b: Any) -> Any: ...
    def sum(self, x: Any) -> Any: ...
    def mean(self, x: Any) -> Any: ...
    def maximum(self, a: Any, b: Any) -> Any: ...
    def stop_gradient(self, x: Any) -> Any: ...
    def zeros_like(self, x: Any) -> Any: ...
    def float32(self, x: Any) -> Any: ...


@dataclass(frozen=True)
class PreferenceSettings:
    """TRL's names and defaults."""

    beta: float = 0.1
    loss_type: str = "sigmoid"  # DPO: sigmoid | ipo | hinge
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


LossFn = Callable[..., LossTerms]


@dataclass(frozen=True)
class Objective:
    name: str
    rows_per_example: int  # 2: rows are [chosen_0..chosen_n-1, rejected_0..rejected_n-1]
    needs_reference: bool
    loss: LossFn  # (ops, policy, reference, settings, **extra) -> LossTerms
