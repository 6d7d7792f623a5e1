"""backends/torch/memory.py with torch.cuda's allocator calls recorded (no GPU here): the
cache bound trims only past the bound, 0 trims after every step, the cap is set and reset
to 1.0, and on the CPU nothing applies."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mlx_tune.backends.base import MemoryLimits  # noqa: E402
from mlx_tune.backends.torch import memory as tm  # noqa: E402


class FakeCuda:
    def __init__(self) -> None:
        self.reserved, self.allocated, self.calls = 0, 0, []

    def memory_reserved(self, device):
        return self.reserved

    def memory_allocated(self, device):
        return self.allocated

    def empty_cache(self):
        self.calls.append("empty_cache")
        self.reserved = self.allocated

    def set_per_process_memory_fraction(self, fraction, device):
        self.calls.append(("fraction", fraction))

    def get_device_properties(self, device):
        return type("Props", (), {"total_memory": 80 * 10**9})


def test_cuda_cache_bound_and_cap(monkeypatch):
    cuda = FakeCuda()
    monkeypatch.setattr(tm.torch, "cuda", cuda)
    memory = tm.TorchMemory(torch.device("cuda", 0))
    with memory.limits(MemoryLimits(cache=100, limit_fraction=0.85)) as applied:
        assert applied.cap == int(0.85 * 80 * 10**9) and applied.wired is None
        assert any("not applicable on CUDA" in n for n in applied.notes)
        cuda.reserved, cuda.allocated = 1000, 950  # 50 cached: under the bound
        memory.trim()
        assert "empty_cache" not in cuda.calls
        cuda.reserved = 1051  # 101 cached: past it
        memory.trim()
        assert cuda.calls.count("empty_cache") == 1 and cuda.reserved == 950
    assert cuda.calls[0] == ("fraction", 0.85) and cuda.calls[-1] == ("fraction", 1.0)
    memory.trim()  # outside the run: no bound, nothing trimmed
    assert cuda.calls.count("empty_cache") == 1
    with memory.limits(MemoryLimits(cache=0, limit_fraction=0.5)):
        cuda.reserved = cuda.allocated + 1
        memory.trim()  # 0: every step's cache goes back
        assert cuda.calls.count("empty_cache") == 2


def test_on_the_cpu_nothing_applies():
    memory = tm.TorchMemory(torch.device("cpu"))
    with memory.limits(MemoryLimits(cache=100, limit_fraction=0.85)) as applied:
        assert (applied.cache, applied.wired, applied.cap) == (None, None, None)
        assert "not applicable" in applied.notes[0]
        memory.trim()
    reading = memory.reading()
    assert reading.cache == 0 and reading.active == reading.resident
