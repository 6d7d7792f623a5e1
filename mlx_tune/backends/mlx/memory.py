"""What the memory planner asks MLX: the accelerator's memory, and what this process holds."""

from __future__ import annotations

import mlx.core as mx


def device_memory() -> tuple[float, str] | None:
    """Metal's recommended working set; None where MLX reports none (its CPU backend)."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if info.get("max_recommended_working_set_size"):
        return float(info["max_recommended_working_set_size"]), "Metal working set"
    return None


def held_memory() -> float:
    """Bytes this process already holds (a loaded model): part of the plan, and not part
    of the RAM still available."""
    return float(mx.get_active_memory())
