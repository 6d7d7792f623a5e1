"""Rank 0 decides, every rank follows: resume, stop, give up, finish.

Every function here is a collective: all ranks call it at the same point, in the same
order, and it runs on the backend's own collectives (``backends.base.Collectives``).
With one process each returns its input and touches nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from mlx_tune.backends.base import Collectives
from mlx_tune.checkpoint.manager import Loaded
from mlx_tune.config.schema import Spec
from mlx_tune.distributed.peers import peer_guard
from mlx_tune.exit_codes import STOP_RULE_EXIT_CODES, StopDecision

_RULES = sorted(STOP_RULE_EXIT_CODES)  # stop rule <-> a small integer on the wire (0 = no stop)


def broadcast_json(obj: Any, comm: Collectives) -> Any:
    """Rank 0's JSON-able ``obj`` on every rank (the other ranks pass anything)."""
    data = comm.broadcast_bytes(json.dumps(obj).encode() if comm.rank == 0 else b"")
    return obj if comm.rank == 0 else json.loads(data.decode())


def share_resume_point(comm: Collectives, loaded: Loaded | None, output_dir: Path, spec: Spec,
                       log: Callable[[str], None]) -> Loaded | None:
    """Every rank gets rank 0's resume decision and, when it resumes, rank 0's checkpoint.

    Rank 0 found and validated the checkpoint (the others have ``loaded=None``). Its meta
    and arrays are broadcast, so the other ranks never read ``output_dir``: it only has to
    exist on rank 0's machine. A checkpoint written by a run with another number of ranks
    resumes as well: its state (data position, RNG, monitors) is the global run's."""
    rank, world = comm.rank, comm.world_size
    if rank == 0 and loaded is not None:
        saved = loaded.meta.get("world_size", 1)
        if saved != world:
            log(f"checkpoint step {loaded.step} was written by a {saved}-rank run; continuing "
                f"on {world} rank{'s' * (world > 1)} with the same global batch of "
                f"{spec.batch_size}")
    if world <= 1:
        return loaded
    with peer_guard(comm):
        head = broadcast_json(None if rank != 0 or loaded is None else
                              {"path": str(loaded.path), "step": loaded.step,
                               "meta": loaded.meta}, comm)
        if head is None:
            return None
        arrays = comm.broadcast_arrays(loaded.arrays if rank == 0 else None)
    if rank == 0:
        return loaded
    return Loaded(path=Path(head["path"]), step=head["step"], arrays=arrays, meta=head["meta"])


def any_rank(flag: bool, comm: Collectives) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    if comm.world_size <= 1:
        return flag
    with peer_guard(comm):
        return comm.all_sum_ints([int(bool(flag))])[0] > 0


def broadcast_flag(flag: bool, comm: Collectives) -> bool:
    """Rank 0's ``flag`` on every rank."""
    if comm.world_size <= 1:
        return flag
    with peer_guard(comm):
        return bool(comm.all_sum_ints([int(bool(flag)) if comm.rank == 0 else 0])[0])


def agree(decision: StopDecision | None, interrupted: str | None,
          comm: Collectives) -> tuple[StopDecision | None, str | None]:
    """One collective at a report boundary: rank 0's stop decision, and whether any rank
    was asked to stop by a signal, become every rank's, so all stop after the same step.

    The other ranks get the rule and step, and a reason saying it came from rank 0."""
    if comm.world_size <= 1:
        return decision, interrupted
    mine = [0, 0, int(interrupted is not None)]
    if comm.rank == 0 and decision is not None:
        mine[:2] = [_RULES.index(decision.rule) + 1, decision.step]
    with peer_guard(comm):
        rule, step, signalled = comm.all_sum_ints(mine)
    if comm.rank != 0:
        decision = (StopDecision(_RULES[rule - 1], f"rank 0 stopped the run "
                                 f"({_RULES[rule - 1]})", step) if rule else None)
    if signalled and interrupted is None:
        interrupted = "a signal on another rank"
    return decision, interrupted


def broadcast_stop(decision: StopDecision | None, comm: Collectives) -> StopDecision | None:
    """Rank 0's early-stopping decision on every rank."""
    return agree(decision, None, comm)[0]


def barrier(comm: Collectives) -> None:
    """Wait until every rank gets here (before exiting: a rank 0 that fails while writing
    the adapter makes the others fail too, instead of reporting success)."""
    if comm.world_size > 1:
        with peer_guard(comm):
            comm.all_sum_ints([1])
