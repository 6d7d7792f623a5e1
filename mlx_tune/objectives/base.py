"""The objective seam: what a training objective reads and what it returns.

A backend's step turns a forward pass into per-row log-probability sums (``RowLogps``);
an objective turns those into a loss *sum*, its denominator and named metrics
(``LossTerms``). The objective never sees a model or a framework: it computes through
``ArrayOps``, which each backend implements (``backends/mlx/ops.py``,
``backends/torch/ops.py``), so one module holds one loss for both backends.

Why sums and counts, never means: the step adds ``loss_sum`` and ``count`` over
micro-batches (and all-reduces them across ranks) and divides once, so the gradient of
2 micro-batches of 4 pairs equals that of one batch of 8, however long the rows are.
Metrics follow the same rule: each is a ``(sum, count)`` pair that reporters divide.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Protocol

Array = Any  # an mx.array or a torch.Tensor; objectives never look inside


class ArrayOps(Protocol):
    """The elementwise ops and reductions the losses need, one implementation per
    framework. Binary ops with a ``value`` take a Python float as their second argument."""

    def float32(self, x: Array) -> Array: ...
    def log_sigmoid(self, x: Array) -> Array: ...
    def sigmoid(self, x: Array) -> Array: ...
    def relu(self, x: Array) -> Array: ...
    def exp(self, x: Array) -> Array: ...
    def log(self, x: Array) -> Array: ...
    def log1p(self, x: Array) -> Array: ...
    def expm1(self, x: Array) -> Array: ...
    def maximum(self, x: Array, value: float) -> Array: ...
    def minimum(self, x: Array, value: float) -> Array: ...
    def where(self, condition: Array, x: Array, y: Array) -> Array: ...
    def sum(self, x: Array) -> Array: ...
    def ones_like(self, x: Array) -> Array: ...
    def stop_gradient(self, x: Array) -> Array: ...


@dataclass(frozen=True)
class RowLogps:
    """One entry per row of the forward batch, each a framework array of shape [R].

    ``logps``: sum over the row's completion (target) tokens of log p(token).
    ``tokens``: how many tokens that is, as floats.
    ``smooth``: sum over those tokens of the vocabulary-mean log-probability; only
    token-level label smoothing (SFT) reads it, so it may be None otherwise.
    """

    logps: Array
    tokens: Array
    smooth: Array | None = None

    def halves(self) -> tuple["RowLogps", "RowLogps"]:
        """(chosen, rejected) of a paired micro-batch laid out as
        [chosen_0..chosen_{n-1}, rejected_0..rejected_{n-1}]."""
        n = self.logps.shape[0] // 2

        def part(a: Array | None, s: slice) -> Array | None:
            return None if a is None else a[s]

        return (RowLogps(self.logps[:n], self.tokens[:n], part(self.smooth, slice(None, n))),
                RowLogps(self.logps[n:], self.tokens[n:], part(self.smooth, slice(n, None))))

    def as_float32(self, ops: ArrayOps) -> "RowLogps":
        """The losses compute in float32 whatever dtype the forward ran in."""
        return RowLogps(ops.float32(self.logps), ops.float32(self.tokens),
                        None if self.smooth is None else ops.float32(self.smooth))

    def mean_logps(self, ops: ArrayOps) -> Array:
        """Length-averaged log-probability per row (ORPO, SimPO, IPO). An empty row
        divides by 1, not 0; the data layer refuses empty completions anyway."""
        return self.logps / ops.maximum(self.tokens, 1.0)


@dataclass
class LossTerms:
    """``loss_sum`` over examples (or tokens), its denominator ``count``, and metrics
    as ``name -> (sum, count)``; the step adds all of them over micro-batches and ranks.
    Values are framework scalars, left lazy until a reporter asks."""

    loss_sum: Array
    count: Array
    metrics: dict[str, tuple[Array, Array]] = field(default_factory=dict)


LOSS_TYPES_WITH_LABEL_SMOOTHING = ("sigmoid", "robust")


@dataclass(frozen=True)
class PreferenceSettings:
    """The objectives' knobs, with TRL's names and TRL's defaults.

    ``beta`` 0.1 is the default of TRL's DPOConfig, KTOConfig, ORPOConfig and CPOConfig
    alike (SimPO runs as CPO's ``loss_type="simpo"`` there, so its default beta is 0.1
    too; the SimPO paper tunes it between 2 and 10, so set it for SimPO).
    ``loss_type`` None means the objective's own default (DPO: "sigmoid").
    ``label_smoothing`` is the token-level epsilon for SFT and the label-flip probability
    for DPO (sigmoid, robust) and SimPO.
    """

    beta: float = 0.1
    loss_type: str | None = None
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


LossFn = Callable[..., LossTerms]


@dataclass(frozen=True)
class Objective:
    """One training objective, registered by name in ``objectives/__init__.py``.

    ``rows_per_example``: 2 for paired objectives (chosen and rejected in one forward),
    1 otherwise. ``needs_reference``: whether ``loss`` reads reference log-probs.
    ``settings_used``: the ``PreferenceSettings`` fields this objective reads; ``check``
    refuses the others when they differ from their defaults, so no key is accepted and
    silently ignored.
    ``loss_types``: accepted ``loss_type`` values, the first the default (empty: the
    objective has no loss_type).
    """

    name: str
    rows_per_example: int
    needs_reference: bool
    loss_fn: LossFn
    settings_used: tuple[str, ...] = ()
    loss_types: tuple[str, ...] = ()

    def loss(self, ops: ArrayOps, policy: RowLogps, reference: RowLogps | None,
             settings: PreferenceSettings, **extra: Any) -> LossTerms:
        if self.needs_reference and reference is None:
            raise ValueError(f"objective {self.name} needs reference log-probabilities")
        ref = None if reference is None else reference.as_float32(ops)
        return self.loss_fn(ops, policy.as_float32(ops), ref, settings, **extra)

    def loss_type(self, settings: PreferenceSettings) -> str | None:
        """The loss_type in effect: the setting, else this objective's default."""
        return settings.loss_type or (self.loss_types[0] if self.loss_types else None)

    def check(self, settings: PreferenceSettings) -> None:
        """Refuse settings this objective cannot honour, as a one-line ValueError that
        names the key and what was expected."""
        defaults = PreferenceSettings()
        for name in PreferenceSettings.field_names():
            if name not in self.settings_used and getattr(settings, name) != getattr(defaults, name):
                raise ValueError(f"{name}: objective {self.name} does not use it "
                                 f"(it reads {', '.join(self.settings_used) or 'none of them'})")
        if settings.loss_type is not None and settings.loss_type not in self.loss_types:
            expected = (f"one of {', '.join(self.loss_types)}" if self.loss_types
                        else "no loss_type (it has a single loss)")
            raise ValueError(f"loss_type: objective {self.name} takes {expected}, "
                             f"got '{settings.loss_type}'")
        if "beta" in self.settings_used and not settings.beta > 0:
            raise ValueError(f"beta: must be > 0, got {settings.beta}")
        smoothing = settings.label_smoothing
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {smoothing}")
        if smoothing > 0 and self.loss_types:
            kind = self.loss_type(settings)
            if kind not in LOSS_TYPES_WITH_LABEL_SMOOTHING:
                raise ValueError(f"label_smoothing: loss_type {kind} has no label smoothing "
                                 f"(only {' and '.join(LOSS_TYPES_WITH_LABEL_SMOOTHING)} do)")
            if kind == "robust" and smoothing >= 0.5:
                raise ValueError(f"label_smoothing: robust DPO needs it below 0.5, got {smoothing}")
        for weight in ("desirable_weight", "undesirable_weight"):
            if weight in self.settings_used and not getattr(settings, weight) > 0:
                raise ValueError(f"{weight}: must be > 0, got {getattr(settings, weight)}")


def pair_count(ops: ArrayOps, chosen: RowLogps) -> Array:
    """The number of pairs in a micro-batch, as a framework scalar (it is summed and
    all-reduced with the loss)."""
    return ops.sum(ops.ones_like(chosen.logps))


def reward_metrics(ops: ArrayOps, chosen_rewards: Array, rejected_rewards: Array,
                   chosen_logps: Array, rejected_logps: Array) -> dict[str, tuple[Array, Array]]:
    """TRL's paired metrics, each a sum over pairs with the pair count as denominator:
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (chosen reward
    strictly above rejected, as TRL's ``>``), ``rewards/margins``, ``logps/chosen``,
    ``logps/rejected``. Inputs are detached here, whatever the caller passed."""
    sg = ops.stop_gradient
    chosen_rewards, rejected_rewards = sg(chosen_rewards), sg(rejected_rewards)
    n = ops.sum(ops.ones_like(chosen_rewards))
    return {
        "rewards/chosen": (ops.sum(chosen_rewards), n),
        "rewards/rejected": (ops.sum(rejected_rewards), n),
        "rewards/accuracies": (ops.sum(ops.float32(chosen_rewards > rejected_rewards)), n),
        "rewards/margins": (ops.sum(chosen_rewards - rejected_rewards), n),
        "logps/chosen": (ops.sum(sg(chosen_logps)), n),
        "logps/rejected": (ops.sum(sg(rejected_logps)), n),
    }
