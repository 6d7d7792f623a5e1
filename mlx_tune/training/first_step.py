"""The longest batch first: one discarded optimizer step on the widest batch, before the
night starts.

Runs die on their first long batch (mlx-lm #1206: the first backward pass; #236: step 50,
when a long example arrives), after the user has gone to bed. So before the first real
step the backend runs one optimizer step on a batch of the run's widest padded width at
the micro-batch size (``Backend.trial_step``), measures its peak, and undoes it: the
weights, the optimizer state, the EMA and the random state come back bit for bit, and the
data stream is never touched, so the run (and a resumed one) trains exactly as without
the check. Its peak goes in the log and the start record beside the planner's
prediction. Over the memory budget, the run stops at once (exit 11) with the planner's
proposal, calibrated by this measurement: more accumulation (a smaller micro-batch),
then gradient checkpointing, then 4-bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mlx_tune.backends.base import Backend
from mlx_tune.config.schema import Spec
from mlx_tune.config.spec import reference_mode
from mlx_tune.data.batch import Batch
from mlx_tune.objectives import get_objective
from mlx_tune.training.planner import ModelShape, divisors, estimate

MB = 2**20


@dataclass(frozen=True)
class FirstStep:
    micro_batch: int
    width: int
    peak: int  # bytes, measured
    predicted: float | None  # bytes, the planner's (None: no planner shape for this model)
    budget: float  # bytes
    proposal: str = ""  # when it does not fit: what would

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def info(self) -> dict[str, Any]:
        return {"micro_batch": self.micro_batch, "width": self.width,
                "peak_mb": round(self.peak / MB, 1), "budget_mb": round(self.budget / MB, 1),
                "predicted_mb": None if self.predicted is None else round(self.predicted / MB, 1)}

    def line(self) -> str:
        planned = "" if self.predicted is None else \
            f", planner {self.predicted / MB:,.0f} MB ({100 * (self.peak / self.predicted - 1):+.0f}%)"
        verdict = "fits" if self.fits else "does NOT fit"
        return (f"first step at the widest batch (micro-batch {self.micro_batch} x "
                f"{self.width} tokens): peak {self.peak / MB:,.0f} MB{planned}; {verdict} "
                f"the budget of {self.budget / MB:,.0f} MB")


def widest_batch(examples: int, width: int, packed: bool, objective: str = "sft") -> Batch:
    """``examples`` examples of ``width`` tokens, every position but the first a target:
    the most a micro-batch of the run can hold (token ids do not change the memory). A
    preference objective's example is two rows (paired; kto's with labels of both kinds)."""
    kto = objective == "kto"  # each example row brings its KL row (data/unpaired.py)
    rows = examples * (2 if kto else get_objective(objective).rows_per_example)
    mask = np.ones((rows, width), np.float32)
    mask[:, 0] = 0
    segments = np.ones((rows, width), np.int32) if packed else None
    labels = (np.arange(examples) % 2).astype(np.float32) if kto else None
    return Batch(np.zeros((rows, width), np.int32), mask, segments,
                 paired=rows > examples, labels=labels)


def check_first_step(backend: Backend, spec: Spec, data: Any, accumulation: int,
                     model_dir: Path, budget: float) -> FirstStep:
    """Run the discarded step and compare it with the budget (and the planner)."""
    micro = max(spec.batch_size // backend.world_size // accumulation, 1)
    widths = getattr(data, "widths", None)
    width = widths.fit(widths.max_length) if widths is not None else spec.max_length
    batch = widest_batch(micro, width, spec.packing, spec.objective)
    if reference_mode(spec) == "precomputed":  # the step's inputs include the reference's
        batch = replace(batch, ref_logps=np.zeros(len(batch.tokens), np.float32))
    peak = backend.trial_step(batch)
    shape = _shape(model_dir)
    predicted = None
    if shape is not None:
        predicted = estimate(shape, spec, micro, width, accumulation, spec.backend).total
    first = FirstStep(micro, width, peak, predicted, budget)
    if first.fits:
        return first
    return replace(first, proposal=propose(shape, spec, first, backend.world_size))


def _shape(model_dir: Path) -> ModelShape | None:
    try:
        return ModelShape.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def propose(shape: ModelShape | None, spec: Spec, first: FirstStep, world_size: int) -> str:
    """The first change that fits, by the planner scaled to this measurement."""
    if shape is None or not first.predicted:
        return ("lower the micro-batch (more --gradient-accumulation-steps), add "
                "--gradient-checkpointing or --quantize 4")
    scale = first.peak / first.predicted  # the planner, calibrated by this step
    per_rank = max(spec.batch_size // world_size, 1)

    def fits(s: Spec, micro: int) -> float | None:
        peak = scale * estimate(shape, s, micro, first.width, per_rank // micro, s.backend).total
        return peak if peak <= first.budget else None

    for steps in divisors(per_rank):
        micro = per_rank // steps
        if micro < first.micro_batch and (peak := fits(spec, micro)):
            return (f"--gradient-accumulation-steps {steps} (micro-batch {micro}; planned "
                    f"{peak / MB:,.0f} MB)")
    changes = [("--gradient-checkpointing", {"gradient_checkpointing": True})]
    if not spec.quantize:
        changes.append(("--quantize 4", {"quantize": 4}))
        changes.append(("--gradient-checkpointing --quantize 4",
                        {"gradient_checkpointing": True, "quantize": 4}))
    for flags, change in changes:
        for steps in divisors(per_rank):
            micro = per_rank // steps
            if (peak := fits(replace(spec, **change), micro)):
                return (f"{flags} --gradient-accumulation-steps {steps} (micro-batch {micro}; "
                        f"planned {peak / MB:,.0f} MB)")
    return ("nothing fits even at micro-batch 1 with gradient checkpointing and 4-bit: "
            "lower --max-length or use a smaller model")
