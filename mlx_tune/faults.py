"""Fault injection for the crash tests and benchmarks/fault_injection.py.

Inert unless ``MLX_TUNE_FAULTS`` is set, e.g. ``MLX_TUNE_FAULTS=save_sleep=2`` makes
every checkpoint shard write pause 2 s half way (after the temp directory exists and
before the manifest), so a test can SIGKILL the process in the middle of a save.
"""

from __future__ import annotations

import os
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
    if manager is None or "save_sleep" not in settings:
        return
    codec, pause = manager.codec, settings["save_sleep"]
    original = codec.save_file

    def slow_save(arrays: dict, path: str) -> None:
        original(arrays, path)
        time.sleep(pause)  # the shard is on disk, the manifest is not: a torn checkpoint

    codec.save_file = slow_save
