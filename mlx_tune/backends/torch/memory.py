"""What the memory planner asks torch: the accelerator's memory, and what this process holds."""

from __future__ import annotations

import torch


def device_memory() -> tuple[float, str] | None:
    """The first CUDA device's memory; None without CUDA."""
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory), "CUDA memory"
    return None


def held_memory() -> float:
    """Host memory the planner need not add back (a CUDA run's model lives on the device)."""
    return 0.0
