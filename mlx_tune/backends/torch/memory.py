"""torch's memory: what the planner asks of it, the run's figures and its controls (the
counterparts of MLX's where they exist).

On CUDA the caching allocator is MLX's buffer cache: ``memory_reserved() -
memory_allocated()`` is what it keeps of freed blocks. It has no byte bound of its own
(``PYTORCH_CUDA_ALLOC_CONF=garbage_collection_threshold:F`` only reclaims relative to
the memory cap, and must be set before CUDA starts), so the bound is kept here: after a
step whose cache passed ``memory.cache_limit_gb``, ``torch.cuda.empty_cache()`` hands it
back (0: after every step, as asked). The cap is
``torch.cuda.set_per_process_memory_fraction(memory.limit_fraction)``; allocations past
it raise an out-of-memory error instead of crowding other processes. A wired limit has
no CUDA equivalent (device memory is never paged out). On the CPU torch has no caching
allocator at all: none of the three applies, and the figures are the resident set's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from mlx_tune.backends.base import AppliedLimits, MemoryLimits, MemoryReading
from mlx_tune.system.memory import peak_resident_bytes, reset_peak_resident, resident_bytes

GB = 1e9


def device_memory() -> tuple[float, str] | None:
    """The first CUDA device's memory; None without CUDA."""
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory), "CUDA memory"
    return None


def held_memory() -> float:
    """Host memory the planner need not add back (a CUDA run's model lives on the device)."""
    return 0.0


def size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 1e6:,.0f} MB"


class TorchMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.cache_bound: int | None = None  # set while memory_limits is active

    def reading(self) -> MemoryReading:
        resident = resident_bytes()
        if self.cuda:
            active = torch.cuda.memory_allocated(self.device)
            return MemoryReading(active, torch.cuda.max_memory_allocated(self.device),
                                 torch.cuda.memory_reserved(self.device) - active, resident)
        peak = peak_resident_bytes()
        return MemoryReading(resident or peak, peak, 0, resident)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_resident()

    def trim(self) -> None:
        """After a step: hand the cache back when it passed the bound (allocator
        statistics are host-side counters: no device sync unless it trims)."""
        if self.cache_bound is None or not self.cuda:
            return
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if cached > self.cache_bound:
            torch.cuda.empty_cache()

    @contextmanager
    def limits(self, limits: MemoryLimits) -> Iterator[AppliedLimits]:
        if not self.cuda:
            yield AppliedLimits(None, notes=(
                "cache bound, wired limit and memory cap: not applicable to torch on the "
                "CPU (no caching allocator)",))
            return
        total = torch.cuda.get_device_properties(self.device).total_memory
        cap = int(limits.limit_fraction * total)
        torch.cuda.set_per_process_memory_fraction(limits.limit_fraction, self.device)
        self.cache_bound = limits.cache
        cache_note = (f"CUDA cache handed back after a step past {size(limits.cache)} "
                      "(memory.cache_limit_gb)") if limits.cache else \
            "CUDA cache emptied after every step (memory.cache_limit_gb: 0)"
        try:
            yield AppliedLimits(limits.cache, None, cap, (
                cache_note,
                f"memory cap {cap / GB:.1f} GB ({limits.limit_fraction:.0%} of the device's "
                f"{total / GB:.1f} GB, memory.limit_fraction)",
                "wired limit: not applicable on CUDA (device memory is not paged)"))
        finally:
            self.cache_bound = None
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
