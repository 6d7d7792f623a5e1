"""Lazy validation: time to the first training step and peak memory with a 1 GB
validation file against none. The file is not opened until the first evaluation, so
both should be the same.

    python benchmarks/lazy_validation.py [--size-gb 1]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RECIPES, TINY, bench_env, train_command  # noqa: E402


def make_data(root: Path, valid_bytes: int) -> Path:
    root.mkdir(parents=True)
    shutil.copy(RECIPES / "train.jsonl", root / "train.jsonl")
    if valid_bytes:
        chunk = (RECIPES / "valid.jsonl").read_bytes()
        with open(root / "valid.jsonl", "wb") as f:
            for _ in range(valid_bytes // len(chunk) + 1):
                f.write(chunk)
    return root


def first_step_seconds(data: Path, out: Path, model: str, env: dict) -> tuple[float, int]:
    """Seconds from launch to the first logged training step, and the peak RSS (MB) then.
    The run is stopped there: the final evaluation would read the validation file."""
    cmd = train_command("--model", model, "--data", str(data), "--output-dir", str(out),
                        "--force-fresh", "--max-steps", "1000", "--batch-size", "8",
                        "--report-every", "1", "--no-eval-at-start", "--eval-steps", str(10**9),
                        "--num-samples", "0", "--no-tensorboard", "--dashboard", "plain")
    tic = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the run exited ({proc.returncode}) before its first step")
            if metrics.exists() and '"type": "train"' in metrics.read_text():
                break
            time.sleep(0.05)
        seconds = time.time() - tic
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak_kb = int(next(line.split()[1] for line in status.splitlines()
                           if line.startswith("VmHWM")))
    finally:
        proc.kill()
        proc.wait()
    return seconds, peak_kb // 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(TINY))
    p.add_argument("--size-gb", type=float, default=1.0)
    args = p.parse_args()
    env = bench_env()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        without = make_data(tmp / "no-valid", 0)
        big = make_data(tmp / "big-valid", int(args.size_gb * 2**30))
        size = (big / "valid.jsonl").stat().st_size / 2**30
        t0, m0 = first_step_seconds(without, tmp / "out0", args.model, env)
        t1, m1 = first_step_seconds(big, tmp / "out1", args.model, env)
    print(f"{'validation file':<22}{'to first step s':>16}{'peak RSS MB':>13}")
    print(f"{'none':<22}{t0:>16.1f}{m0:>13}")
    print(f"{f'{size:.2f} GB valid.jsonl':<22}{t1:>16.1f}{m1:>13}")
    print(f"ratio (with / without): time {t1 / t0:.2f}, memory {m1 / m0:.2f}")


if __name__ == "__main__":
    main()
