""""Is it actually training?": the guard against a run that prints plausible losses while
no weight moves.

The bug class it catches: a loss computed from model outputs taken outside the
differentiated function (mlx-lm-lora's ORPO and CPO, 2025-26), or weights that are not
the ones the optimizer updates. Loss, rewards and accuracy still print sensible numbers;
the gradients are exactly zero and the adapter is byte-identical after a thousand steps.

Over the first ``steps`` optimizer steps with a learning rate above 0 (a warmup that
starts at 0 does not count) and a finite update: if every gradient norm was exactly 0,
or the trainable weights are bitwise what they were before the first of those steps,
the run stops with rule "not_training" (exit 13), checkpointed first like every stop.
"""

from __future__ import annotations

from typing import Any, Optional

from mlx_tune.training.monitors import StopDecision

GUARD_STEPS = 3  # optimizer steps with lr > 0 before the verdict


class TrainingGuard:
    def __init__(self, backend: Any, steps: int = GUARD_STEPS):
        self.backend, self.steps = backend, steps
        self.seen = 0  # finite steps with lr > 0 observed so far
        self.moved = False  # some gradient norm was not exactly 0
        self.before: Optional[str] = None  # digest of the trainable weights before them
        self.done = False

    def before_step(self, lr: float) -> None:
        """Called before each optimizer step: remembers the weights the first time the
        learning rate is above 0."""
        if not self.done and lr > 0 and self.before is None:
            digest = getattr(self.backend, "trainable_digest", None)
            self.before = digest() if digest is not None else ""

    def observe(self, step: int, lr: float, grad_norm: float,
                finite: bool) -> Optional[StopDecision]:
        """Feed each step once its values are read; a decision once the verdict is in."""
        if self.done or lr <= 0 or not finite:
            return None
        self.seen += 1
        self.moved |= grad_norm != 0.0
        if self.seen < self.steps:
            return None
        self.done = True
        n = self.steps
        if not self.moved:
            return StopDecision("not_training", f"every gradient was exactly zero in the first "
                                f"{n} steps with a learning rate above 0: no trainable weight "
                                "gets a gradient from the loss (is the model's forward outside "
                                "the differentiated function, or detached?)", step)
        digest = getattr(self.backend, "trainable_digest", None)
        if self.before and digest is not None and digest() == self.before:
            return StopDecision("not_training", f"the trainable weights are bitwise unchanged "
                                f"after {n} steps with a learning rate above 0 and nonzero "
                                "gradients: the optimizer updates other weights than the "
                                "model uses", step)
        return None
