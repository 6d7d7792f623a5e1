"""Fault injection for the crash tests and benchmarks/fault_injection.py.

Inert unless ``MLX_TUNE_FAULTS`` is set (comma-separated):
- ``save_sleep=2``: every checkpoint shard write pauses 2 s half way (after the temp
  directory exists, before the manifest), so a test can SIGKILL the process mid-save;
- ``disk_full``: every shard write fails with ENOSPC, as on a full disk;
- ``oom_tokens=N``: a training step whose micro-batch holds more than N token positions
  (rows x padded width) dies as a Metal out-of-memory does: the error on stderr, then a
  native abort (SIGABRT). A long batch crashes; the same rows in smaller micro-batches
  pass (the supervisor's adaptation, tests/test_supervisor_e2e.py).
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Any


def _settings() -> dict[str, float]:
    raw = os.environ.get("MLX_TUNE_FAULTS", "")
    out = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        key, _, value = item.partition("=")
        out[key] = float(value or 1)
    return out


def install(manager: Any) -> None:
    """Wrap the manager's codec according to MLX_TUNE_FAULTS (no-op when unset)."""
    settings = _settings()
    if manager is None or not settings.keys() & {"save_sleep", "disk_full"}:
        return
    codec = manager.codec
    original = codec.save_file

    def faulty_save(arrays: dict, path: str) -> None:
        if "disk_full" in settings:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        original(arrays, path)
        # The shard is on disk, the manifest is not: a torn checkpoint if killed now.
        time.sleep(settings.get("save_sleep", 0))

    codec.save_file = faulty_save


# What MLX prints when a Metal command buffer cannot get its memory (then it aborts).
METAL_OOM = ("libc++abi: terminating due to uncaught exception of type std::runtime_error: "
             "[METAL] Command buffer execution failed: Insufficient Memory "
             "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")


def install_step(backend: Any) -> None:
    """Wrap ``backend.step`` according to MLX_TUNE_FAULTS ``oom_tokens`` (no-op unset)."""
    limit = _settings().get("oom_tokens")
    if limit is None:
        return
    original = backend.step

    def step(micro_batches: list, *args: Any, **kwargs: Any) -> Any:
        widest = max(m.tokens.shape[0] * m.tokens.shape[1] for m in micro_batches)
        if widest > limit:
            print(METAL_OOM, file=sys.stderr, flush=True)
            os.abort()
        return original(micro_batches, *args, **kwargs)

    backend.step = step
