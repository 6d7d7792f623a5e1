"""Which launcher started this process, and among how many ranks: read from what the
launchers put in the environment, without importing a framework.

One detection for everything that asks: the torch backend (whether to join a process
group) and distributed/launch.py (does the launch fit the backend).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def mlx_launch_world() -> int:
    """Ranks started by ``mlx.launch`` (0 when it did not start this process)."""
    env = os.environ
    if "MLX_RANK" not in env:
        return 0
    if env.get("MLX_WORLD_SIZE", "").isdigit():  # the nccl backend says it outright
        return int(env["MLX_WORLD_SIZE"])
    try:  # the ring backend: one host file entry per rank
        ring = json.loads(Path(env.get("MLX_HOSTFILE", "")).read_text())
    except (OSError, ValueError):
        ring = []  # `mlx.launch -n 1` writes an empty host file
    return max(len(ring) if isinstance(ring, list) else 1, 1)


def torchrun_world() -> int:
    """Ranks started by ``torchrun`` (0 when it did not start this process)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or {"RANK", "WORLD_SIZE"} <= set(env):
        return int(env.get("WORLD_SIZE", "1") or 1)
    return 0


LAUNCHERS = {"mlx.launch": mlx_launch_world, "torchrun": torchrun_world}


def launched_world() -> tuple[int, str]:
    """How many ranks a launcher started this process among (1 when none), and which."""
    for name, world in LAUNCHERS.items():
        if ranks := world():
            return ranks, name
    return 1, ""
