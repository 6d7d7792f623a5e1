"""The contract between the backend-agnostic loop and a framework (MLX or PyTorch).

A backend owns arrays: the model, the optimizer, the compiled step, random state of
the framework. It never decides *when* anything happens (evaluate, save, stop): the
loop does, so every feature above this line works the same on both backends.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from mlx_tune.data.batch import Batch
from mlx_tune.checkpoint.format import ArrayCodec
from mlx_tune.config.schema import Spec, SpecError
from mlx_tune.objectives import SFT
from mlx_tune.objectives.base import Objective, PreferenceSettings


# Spec target names -> the last component of module names, in mlx-lm's and in
# transformers' models alike (Mistral/Llama/Qwen names, and Mixtral-style w1/w2/w3).
TARGET_SUFFIXES = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",),
                   "o": ("o_proj", "out_proj"), "gate": ("gate_proj", "w1"),
                   "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}


def match_targets(linear_names: Sequence[str], targets: Sequence[str]) -> list[str]:
    """Module paths inside a transformer block (e.g. ``self_attn.q_proj``) for the spec's
    targets, given the paths of the block's linear layers."""
    keys = []
    for target in targets:
        found = [n for n in linear_names if n.rsplit(".", 1)[-1] in TARGET_SUFFIXES[target]]
        if not found:
            raise SpecError(f"lora.targets: this model has no '{target}' projection "
                             f"(its linear layers are: {', '.join(sorted(linear_names))})")
        keys.extend(found)
    return keys


@dataclass
class StepConfig:
    """What a backend's step needs from the spec, the same on every backend."""

    grad_clip: float  # 0 = off
    label_smoothing: float
    ema_decay: float | None  # None = no EMA
    world_size: int  # > 1: sums are all-reduced across ranks inside the step
    gradient_noise: bool = False  # add N(0, noise_std^2) to the clipped gradients
    chunked_loss: bool = False  # cross-entropy over chunks of positions (chunked_loss.py)
    objective: Objective = SFT
    settings: PreferenceSettings = field(default_factory=PreferenceSettings)


# A metric as a sum and its own denominator: both add up across micro-batches and ranks.
Metrics = dict[str, tuple[Any, Any]]


@dataclass
class StepResult:
    """What one optimizer step reports. Values may be lazy framework scalars: the loop
    turns them into floats only at report time (``Backend.to_floats``), so a step never
    forces a host sync it does not need."""

    loss: Any  # the objective's loss over the whole step (loss_sum / count), before the update
    tokens: Any  # target tokens in the step (what throughput counts)
    grad_norm: Any  # global gradient norm before clipping
    finite: Any  # 1 if the update was applied, 0 if it was skipped as non-finite
    count: Any = None  # the loss's denominator (target tokens for sft, pairs...); None = tokens
    metrics: Metrics = field(default_factory=dict)  # the objective's, as (sum, count)

    def values(self) -> list[Any]:
        """What the loop reads at report time, in this order: loss, tokens, grad norm,
        finite, count, then each metric's sum and count."""
        count = self.tokens if self.count is None else self.count
        return [self.loss, self.tokens, self.grad_norm, self.finite, count,
                *(v for pair in self.metrics.values() for v in pair)]


@dataclass
class EvalResult:
    """Sums over the evaluated rows; the loop derives means, so ranks and batches add up.

    ``tokens`` is the loss's denominator (target tokens for sft, pairs for a paired
    objective). A backend computes ``loss_sum``, ``tokens`` and each metric's (sum, count)
    as one vector (``as_vector``, metric names in a fixed order), so that a single
    collective adds them up across ranks; ``from_vector`` reads it back."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)

    def as_vector(self) -> list[Any]:
        return [self.loss_sum, self.tokens,
                *(v for pair in self.metrics.values() for v in pair)]

    @classmethod
    def from_vector(cls, values: Sequence[float], names: Sequence[str]) -> "EvalResult":
        if len(values) != 2 + 2 * len(names):
            raise ValueError(f"expected {2 + 2 * len(names)} evaluation sums, got {len(values)}")
        v = [float(x) for x in values]
        return cls(v[0], v[1], {n: (v[2 + 2 * i], v[3 + 2 * i]) for i, n in enumerate(names)})

    def __add__(self, other: "EvalResult") -> "EvalResult":
        names = list(dict.fromkeys([*self.metrics, *other.metrics]))
        zero = (0.0, 0.0)
        return EvalResult(self.loss_sum + other.loss_sum, self.tokens + other.tokens,
                          {n: tuple(a + b for a, b in zip(self.metrics.get(n, zero),
                                                           other.metrics.get(n, zero)))
                           for n in names})

    def astuple(self) -> tuple[float, ...]:
        """(loss_sum, tokens, then each metric's sum, in order)."""
        return (self.loss_sum, self.tokens, *(s for s, _ in self.metrics.values()))

    def means(self) -> dict[str, float]:
        """Each metric as sum / count (nan where nothing was counted)."""
        return {n: s / c if c else float("nan") for n, (s, c) in self.metrics.items()}

@dataclass(frozen=True)
class MemoryReading:
    """Bytes, read at a report boundary. ``active``: what live arrays hold (the
    framework's allocator); ``peak``: its highest value since the last reset; ``cache``:
    freed buffers the allocator keeps for reuse (MLX's buffer cache, torch's reserved but
    unallocated blocks); ``resident``: the process's resident set as the OS counts it
    (None where it does not say)."""

    active: int
    peak: int
    cache: int = 0
    resident: int | None = None

    @property
    def footprint(self) -> int:
        """What the process costs the machine: the larger of the resident set and
        active + cache (Metal buffers may not all show in the resident set)."""
        return max(self.resident or 0, self.active + self.cache)


@dataclass(frozen=True)
class MemoryLimits:
    """What a run asks of the allocator (training/memory.py resolves them from the
    spec). ``cache``: bytes the buffer cache may keep (0 = none); ``limit_fraction``:
    the memory cap as a fraction of the device's recommended working set (MLX on Metal)
    or of device memory (torch on CUDA)."""

    cache: int
    limit_fraction: float


@dataclass(frozen=True)
class AppliedLimits:
    """What ``Backend.memory_limits`` set, in bytes (None: not set here), and one line per
    setting saying what it is or why it does not apply."""

    cache: int | None
    wired: int | None = None
    cap: int | None = None
    notes: tuple[str, ...] = ()

    def info(self) -> dict[str, float | None]:
        """MB figures for the run's start record (metrics.jsonl, dashboard, report)."""
        mb = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
        return {"cache_limit_mb": mb(self.cache), "wired_limit_mb": mb(self.wired),
                "memory_cap_mb": mb(self.cap)}



@dataclass
class ModelInfo:
    path: str  # resolved local directory
    total_params: int
    trainable_params: int
    num_layers: int
    quantized_bits: int | None


# How long a collective may wait for a peer (seconds, 0 = forever): the torch process
# group's timeout and distributed/peers.py's watchdog read the same setting.
TIMEOUT_ENV = "MLX_TUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0


def timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise SpecError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


class Collectives(Protocol):
    """The few collectives the framework-neutral code (``mlx_tune.distributed``) needs,
    on the framework's own engine. Every rank calls each at the same point, in the same
    order; with one process (``world_size == 1``) each returns its input and talks to
    nobody."""

    rank: int  # 0 .. world_size-1; rank 0 decides, and alone writes files
    world_size: int  # data-parallel processes in the run (1 = no distribution)

    def all_sum_ints(self, values: Sequence[int]) -> list[int]:
        """Each value summed over all ranks."""
        ...

    def broadcast_bytes(self, data: bytes) -> bytes:
        """Rank 0's ``data`` on every rank (the other ranks pass anything, e.g. b"")."""
        ...

    def broadcast_arrays(self, arrays: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0's named arrays on every rank, bit for bit, whatever their dtype (the
        other ranks pass None); the result is in the backend's codec's array type."""
        ...


class Backend(Collectives, Protocol):
    name: str
    tokenizer: Any  # a Hugging Face tokenizer, shared with the data layer
    codec: ArrayCodec  # how the checkpoint manager materializes and writes arrays

    def load(self, spec: Spec, model_dir: Path) -> ModelInfo: ...

    def step(self, micro_batches: Sequence[Batch], lr: float, noise_std: float) -> StepResult: ...

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        """Sums over this rank's batches, added up across all ranks."""
        ...

    def state_dict(self) -> tuple[dict[str, Any], dict]: ...

    def load_state_dict(self, arrays: dict[str, Any], meta: dict) -> None: ...

    def ema_weights(self) -> AbstractContextManager[None]: ...

    def save_adapter(self, directory: Path) -> None: ...

    def load_adapter(self, directory: Path) -> None:
        """Weights saved by ``save_adapter`` (same spec) into the loaded model; ValueError
        when they do not fit it."""
        ...

    def generate(self, messages: list[dict], max_tokens: int,
                 tools: list[dict] | None = None) -> str:
        """Greedy reply; ``tools`` (function specs) go to the chat template."""
        ...

    def memory(self) -> MemoryReading: ...

    def reset_peak_memory(self) -> None: ...

    def memory_limits(self, limits: MemoryLimits) -> AbstractContextManager[AppliedLimits]:
        """Apply ``limits`` for the run (cache bound; on macOS the wired limit and the
        memory cap); yields what was set; the previous values come back on exit."""
        ...

    def score_rows(self, batch: Batch) -> Any:
        """Each row's sum of log p(target) over its target tokens, as a float32 numpy
        array [rows]: the model as it is, in evaluation mode (no dropout), no gradient,
        the step's own ``row_logps`` (chunked when the step is). The precomputed
        reference policy (training/reference.py) is these values before step 0."""
        ...

    def trial_step(self, micro_batch: Batch) -> int:
        """One optimizer step on ``micro_batch`` whose effects are then undone (weights,
        optimizer state, EMA, random state: bit for bit); returns its peak memory, bytes."""
        ...

    def compiled_shapes(self) -> int: ...

    def to_floats(self, values: Sequence[Any]) -> list[float]: ...
