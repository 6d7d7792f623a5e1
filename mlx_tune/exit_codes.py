"""Every process exit code mlx-tune returns, in one table.

Scripts and schedulers branch on these, so they are part of the interface: a number
never changes meaning. ``mlx-tune train`` can return any of them; the other commands
return 0, 1 or 2 (and 130 on Ctrl-C).
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_ERROR = 1  # an error, or a command that could not do its job (lr-find: no suggestion)
EXIT_USAGE = 2  # a bad spec or command line
EXIT_PLATEAU = 3  # early stop: the training loss stopped improving
EXIT_VAL_PLATEAU = 4  # early stop: the validation loss stopped improving
EXIT_GRAD_SPIKE = 5  # early stop: gradient norms spiked
EXIT_NONFINITE = 6  # early stop: NaN/inf loss or gradients
EXIT_CHECKPOINT_FAILURES = 7  # checkpoint saves failed several times in a row
EXIT_PEER_LOST = 8  # a rank of a distributed run died or stopped answering
EXIT_DIR_IN_USE = 9  # another live run holds output_dir (checkpoint/rundir.py)
EXIT_BAD_DATA = 10  # a record met mid-run could not be used; the step was checkpointed first
EXIT_OVER_MEMORY_BUDGET = 11  # the widest batch's first step does not fit the memory budget
EXIT_MEMORY_GROWTH = 12  # early stop: resident memory kept growing (a leak); checkpointed first
EXIT_NOT_TRAINING = 13  # early stop: zero gradients or unchanged weights; checkpointed first
EXIT_SUPERVISOR_GAVE_UP = 14  # --supervise: the run kept crashing, max_restarts reached
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM (128 + SIGINT, the shell's convention)

# Early-stopping rule name -> exit code (the rules live in training/monitors.py; the
# loop and the distributed decisions pass a StopDecision between them).
STOP_RULE_EXIT_CODES = {
    "plateau": EXIT_PLATEAU,
    "val_plateau": EXIT_VAL_PLATEAU,
    "grad_spike": EXIT_GRAD_SPIKE,
    "nonfinite": EXIT_NONFINITE,
    "not_training": EXIT_NOT_TRAINING,  # training/guard.py
    "memory_growth": EXIT_MEMORY_GROWTH,  # training/memory.py
}


@dataclass(frozen=True)
class StopDecision:
    """Why and when a run should stop; ``reason`` is a complete sentence. Lives beside
    the exit codes so that everything which decides or agrees on a stop (the monitors,
    the loop, rank 0's broadcast) shares it without importing one another."""

    rule: str
    reason: str
    step: int

    @property
    def exit_code(self) -> int:
        return STOP_RULE_EXIT_CODES[self.rule]
