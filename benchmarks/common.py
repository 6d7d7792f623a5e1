"""Helpers shared by the benchmark scripts: the environment both sides run in, running
`mlx-tune train` as a child, and reading its throughput back from metrics.jsonl."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "mlx_tune" / "assets" / "tiny-mistral"
RECIPES = REPO / "data" / "recipes"
sys.path.insert(0, str(REPO))

from mlx_tune.system.blas import find_openblas, preload_env  # noqa: E402


def bench_env() -> dict:
    """Every process measured gets the same BLAS: the OpenBLAS mlx-tune would preload
    (MLX_TUNE_OPENBLAS, else the system's, else the pip-installed one)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    lib = find_openblas() if sys.platform.startswith("linux") else None
    # already preloaded and marked: mlx-tune need not re-exec
    return preload_env(lib, env) if lib else env


def train_command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "mlx_tune", "train", *flags]


def run(cmd: list[str], env: dict, *, tty: bool = False) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MB, output) of one child; `tty` runs it on a pseudo
    terminal (util-linux `script`), as a user at a terminal would."""
    if tty:
        cmd = ["script", "-qec", " ".join(f"'{c}'" for c in cmd), "/dev/null"]
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{output[-3000:]}")
    return time.perf_counter() - tic, usage.ru_maxrss // 1024, output


def train_records(out_dir: Path) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "train"]


def tokens_per_second(out_dir: Path) -> float:
    """Median over report intervals (the first excluded: compilation) of tokens trained
    divided by wall time between consecutive reports."""
    train = train_records(out_dir)
    rates = [(b["trained_tokens"] - a["trained_tokens"]) / (b["wall_time"] - a["wall_time"])
             for a, b in zip(train, train[1:])]
    return statistics.median(rates[1:] or rates)
