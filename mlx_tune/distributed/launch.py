"""Does this launch fit the backend and the spec? Checked before anything loads."""

from __future__ import annotations

from mlx_tune.backends import registry
from mlx_tune.backends.launchers import launched_world
from mlx_tune.config.schema import Spec, SpecError


def check_world(spec: Spec, world_size: int, backend_name: str = "") -> None:
    """Fail in the first second, on every rank alike, when the launch and the spec do not
    fit: a launcher's ranks that the backend cannot see (each would train alone and
    overwrite the others' output), or a batch that the ranks cannot share."""
    launched, launcher = launched_world()
    if launched > 1 and world_size <= 1:
        owners = [e.name for e in registry.BACKENDS.values() if e.launcher == launcher]
        hint = (f"add --backend {owners[0]}: {launcher} starts the ranks of the {owners[0]} "
                "backend (" + ", ".join(f"{e.name} runs start with {e.launcher}"
                                        for e in registry.BACKENDS.values()) + ")"
                if owners else f"no registered backend is started by {launcher}")
        raise SpecError(f"this process is one of {launched} ranks started by {launcher}, but "
                        f"the {backend_name or 'chosen'} backend sees a single process: {hint}")
    if world_size <= 1:
        return
    if spec.batch_size % world_size:
        raise SpecError(f"batch_size={spec.batch_size} cannot be split evenly across "
                        f"{world_size} data-parallel ranks: use a multiple of {world_size} "
                        "(batch_size is the global batch, summed over all ranks)")
    per_rank, ga = spec.batch_size // world_size, spec.gradient_accumulation_steps
    if isinstance(ga, int) and per_rank % ga:
        raise SpecError(f"batch_size={spec.batch_size} over {world_size} ranks is {per_rank} "
                        f"per rank, which gradient_accumulation_steps={ga} does not divide")
