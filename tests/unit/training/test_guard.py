"""The not-training guard's rules, on a fake backend whose weights digest is set by hand."""

from __future__ import annotations

from mlx_tune.exit_codes import EXIT_NOT_TRAINING
from mlx_tune.training.guard import GUARD_STEPS, TrainingGuard


class Weights:
    def __init__(self) -> None:
        self.version = 0

    def trainable_digest(self) -> str:
        return f"w{self.version}"


def run(guard: TrainingGuard, backend: Weights, steps: list[tuple[float, float, bool, bool]]):
    """steps: (lr, grad_norm, finite, weights change). The first decision, if any."""
    for i, (lr, norm, finite, moves) in enumerate(steps, start=1):
        guard.before_step(lr)
        backend.version += moves
        decision = guard.observe(i, lr, norm, finite)
        if decision is not None:
            return decision
    return None


def test_zero_gradients_stop_after_the_first_steps_with_a_learning_rate():
    w = Weights()
    decision = run(TrainingGuard(w), w, [(1e-3, 0.0, True, False)] * 10)
    assert decision.rule == "not_training" and decision.exit_code == EXIT_NOT_TRAINING
    assert decision.step == GUARD_STEPS and "exactly zero" in decision.reason


def test_a_warmup_from_zero_and_skipped_steps_do_not_count():
    w = Weights()
    steps = [(0.0, 0.0, True, False)] * 5 + [(1e-3, float("nan"), False, False)] * 2 \
        + [(1e-3, 0.0, True, False)] * GUARD_STEPS
    decision = run(TrainingGuard(w), w, steps)
    assert decision.step == 5 + 2 + GUARD_STEPS


def test_unchanged_weights_stop_even_with_gradients():
    w = Weights()
    decision = run(TrainingGuard(w), w, [(1e-3, 0.5, True, False)] * 10)
    assert decision.step == GUARD_STEPS and "bitwise unchanged" in decision.reason


def test_a_training_run_passes_and_is_judged_once():
    w = Weights()
    guard = TrainingGuard(w)
    # One zero gradient among moving steps is fine; later frozen steps are not re-judged.
    assert run(guard, w, [(1e-3, 0.0, True, True), (1e-3, 0.3, True, True),
                          (1e-3, 0.2, True, True)] + [(1e-3, 0.0, True, False)] * 5) is None
    assert guard.done
