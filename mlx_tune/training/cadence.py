"""When to evaluate: pure functions of the step, so a resumed run keeps the rhythm."""

from __future__ import annotations


def is_eval_step(step: int, *, eval_steps: int, max_steps: int, schedule: str = "fixed") -> bool:
    """True when evaluation runs after `step` optimizer updates (step 0 = before training).

    ``fixed``: every ``eval_steps`` and at the last step.
    ``adaptive``: validation is most informative early, when the loss moves fast, and
    least informative late, when it barely moves. So: every ``eval_steps // 4`` during
    the first 10% of the run, every ``eval_steps`` until half way, then every
    ``2 * eval_steps``; always at the last step.
    """
    if step == max_steps:
        return True
    if step <= 0:
        return False
    if schedule == "adaptive":
        if step <= max_steps * 0.1:
            every = max(1, eval_steps // 4)
        elif step <= max_steps * 0.5:
            every = eval_steps
        else:
            every = 2 * eval_steps
        return step % every == 0
    return step % eval_steps == 0


def gradient_noise_std(step: int, eta: float, gamma: float) -> float:
    """Standard deviation of the gradient noise at `step`: variance eta / (1 + step)^gamma
    (Neelakantan et al., 2015)."""
    if eta <= 0:
        return 0.0
    return (eta / (1.0 + step) ** gamma) ** 0.5
