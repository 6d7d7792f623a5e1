"""What the supervisor does about a crash: restart after a backoff, halve the micro-batch
first when the crash looks like memory, or give up with the reason.

``batch_size`` is the effective batch (sequences per optimizer step) and the data order
follows it alone; the accumulation only splits each batch into micro-batches. So halving
the micro-batch means doubling ``gradient_accumulation_steps`` (to the next number that
divides the batch) and nothing else: the same rows reach the same optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mlx_tune.supervise.crashes import Ending

MAX_BACKOFF_FACTOR = 16
# A memory crash at the same step as the previous one, after the micro-batch was halved
# for it, this many times: halving does not help there; give up instead of looping.
MAX_REPEATS_AFTER_ADAPTING = 2


@dataclass(frozen=True)
class Action:
    kind: Literal["restart", "give_up"]
    reason: str  # one line: why the supervisor restarts or gives up
    delay_s: float = 0.0
    accumulation: int | None = None  # the new accumulation when the micro-batch is halved


def next_accumulation(batch_size: int, accumulation: int) -> int | None:
    """The smallest accumulation whose micro-batch is at most half the current one and
    that divides the batch; None when the micro-batch is already one sequence."""
    micro = batch_size // accumulation
    if micro < 2:
        return None
    for steps in range(accumulation + 1, batch_size + 1):
        if batch_size % steps == 0 and batch_size // steps <= micro // 2:
            return steps
    return None


def where(step: int | None) -> str:
    """When a crash happened, as far as the run's reports tell."""
    return "before the first report" if step is None else f"after step {step}"


@dataclass
class Policy:
    max_restarts: int
    backoff_s: float
    batch_size: int
    accumulation: int
    restarts: int = 0
    adaptations: list[tuple[int, int]] = field(default_factory=list)  # (from, to)
    _last: tuple | None = None  # (memory, cause, step) of the previous crash
    _adapted_last: bool = False  # the previous crash was answered by halving
    _repeats: int = 0  # memory crashes at that same step since halving for it
    _stalled: int = 0  # crashes in a row that got no further than the one before

    def after_crash(self, ending: Ending, step: int | None) -> Action:
        """The answer to one crash ``ending`` that happened ``step`` (the furthest step
        the run had reported)."""
        signature = (ending.memory, "memory" if ending.memory else ending.cause, step)
        same = signature == self._last
        previous_step = self._last[2] if self._last else None
        self._stalled = self._stalled + 1 if (
            self._last is not None and (step or 0) <= (previous_step or 0)) else 0
        self._last = signature
        what = f"{ending.cause} {where(step)}" + (f": {ending.evidence}" if ending.evidence else "")

        accumulation = None
        if ending.memory:
            self._repeats = self._repeats + 1 if same and self._adapted_last else 0
            if self._repeats >= MAX_REPEATS_AFTER_ADAPTING:
                return Action("give_up", f"out of memory {where(step)} again after halving the "
                              f"micro-batch for it {self._repeats} times (now "
                              f"{self.micro_batch}); the same crash would come back: lower "
                              f"max_length or batch_size, or quantize ({what})")
            accumulation = next_accumulation(self.batch_size, self.accumulation)
            if accumulation is None:
                return Action("give_up", f"out of memory {where(step)} with a micro-batch of "
                              f"{self.micro_batch} sequence(s): nothing left to halve; lower "
                              f"max_length or batch_size, or quantize ({what})")
        self._adapted_last = accumulation is not None
        if self.restarts >= self.max_restarts:
            return Action("give_up", f"the run crashed {self.restarts + 1} times; "
                          f"max_restarts ({self.max_restarts}) reached. The last crash: {what}")
        self.restarts += 1
        delay = self.backoff_s * min(2 ** self._stalled, MAX_BACKOFF_FACTOR)
        reason = f"{what}; restart {self.restarts} of at most {self.max_restarts}"
        if accumulation is not None:
            old_micro = self.micro_batch
            self.adaptations.append((self.accumulation, accumulation))
            self.accumulation = accumulation
            reason += (f", with the micro-batch halved ({old_micro} -> {self.micro_batch} "
                       f"sequences, gradient_accumulation_steps {self.adaptations[-1][0]} -> "
                       f"{accumulation}; the batch of {self.batch_size} stays)")
        return Action("restart", reason, delay, accumulation)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.accumulation
