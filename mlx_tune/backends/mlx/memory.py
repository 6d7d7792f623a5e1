"""MLX's memory: what the planner asks of it (the accelerator's memory, what this process
holds), and the run's controls, set on entry and put back on exit.

* The buffer cache is bounded everywhere (``mx.set_cache_limit``; by default MLX lets it
  grow to the memory limit while ``peak_memory`` stays flat, ml-explore/mlx #3993).
* On macOS (Metal: the device reports ``max_recommended_working_set_size``), as mlx-lm
  does, the wired limit is the recommended working set (``mx.set_wired_limit``: the
  model's buffers stay resident instead of being paged), and the memory cap
  ``mx.set_memory_limit`` is ``memory.limit_fraction`` of it (0.85, Unsloth's default):
  past it MLX frees its cache and waits for buffers before it allocates more.
* Elsewhere (Linux, CPU or CUDA) no working set is reported: the wired limit and the cap
  are left alone (on Linux ``set_wired_limit`` does nothing at all).

Each setter returns the value it replaced; exit sets those back in reverse order.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import mlx.core as mx

from mlx_tune.backends.base import AppliedLimits, MemoryLimits

GB = 1e9
WORKING_SET = "max_recommended_working_set_size"


def device_memory() -> tuple[float, str] | None:
    """Metal's recommended working set; None where MLX reports none (its CPU backend)."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if info.get(WORKING_SET):
        return float(info[WORKING_SET]), "Metal working set"
    return None


def held_memory() -> float:
    """Bytes this process already holds (a loaded model): part of the plan, and not part
    of the RAM still available."""
    return float(mx.get_active_memory())


def device_info(mx: Any = mx) -> dict:
    """``mx.device_info()`` (older MLX: ``mx.metal.device_info()``); {} when neither
    answers."""
    try:
        if hasattr(mx, "device_info"):
            return dict(mx.device_info())
        return dict(mx.metal.device_info()) if mx.metal.is_available() else {}
    except Exception:  # noqa: BLE001 - some backends raise here; the info is optional
        return {}


def size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 1e6:,.0f} MB"


@contextmanager
def memory_limits(mx: Any, limits: MemoryLimits, info: dict) -> Iterator[AppliedLimits]:
    """Apply ``limits`` through ``mx`` (``mlx.core``, or a stand-in in tests) on the
    device described by ``info``; yields what was set."""
    restore: list[tuple[Any, int]] = []
    notes: list[str] = []
    wired = cap = None
    try:
        working = info.get(WORKING_SET)
        if working:
            try:
                restore.append((mx.set_wired_limit, mx.set_wired_limit(int(working))))
                wired = int(working)
                notes.append(f"wired limit {working / GB:.1f} GB (the recommended working "
                             "set, as mlx-lm sets it)")
            except (ValueError, RuntimeError) as e:  # over the system's wired limit
                notes.append(f"wired limit not set ({e}); `sudo sysctl iogpu.wired_limit_mb=N` "
                             "raises the system's")
            cap = int(limits.limit_fraction * working)
            restore.append((mx.set_memory_limit, mx.set_memory_limit(cap)))
            notes.append(f"memory cap {cap / GB:.1f} GB ({limits.limit_fraction:.0%} of the "
                         "working set, memory.limit_fraction)")
        else:
            notes.append("wired limit and memory cap: not applicable here (no Metal "
                         "working set on this device)")
        restore.append((mx.set_cache_limit, mx.set_cache_limit(limits.cache)))
        notes.append(f"buffer cache bounded at {size(limits.cache)} "
                     "(memory.cache_limit_gb)" if limits.cache else
                     "no buffer cache: freed buffers go back at once (memory.cache_limit_gb: 0)")
        yield AppliedLimits(limits.cache, wired, cap, tuple(notes))
    finally:
        for setter, previous in reversed(restore):
            setter(previous)
