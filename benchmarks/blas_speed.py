"""Quickstart throughput with each BLAS MLX's Linux CPU backend can get: the pip-installed
OpenBLAS (cmeel-openblas, what a bare machine gets), MLX's bundled reference BLAS (what it
got before), and the system OpenBLAS (Debian's libopenblas0-pthread) where installed.

Each run is `mlx-tune train --config configs/quickstart.yaml --max-steps N` in its own
process; tokens/s is the median of per-report rates after the first report (compilation
excluded), as in benchmarks/throughput.py.

    python benchmarks/blas_speed.py                 # 20 steps each
    python benchmarks/blas_speed.py --which pip system
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, run, tokens_per_second, train_command  # noqa: E402

from mlx_tune.system import blas, blas_choice  # noqa: E402


def blas_env(which: str) -> dict | None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH", blas.MARKER, blas.DISABLE, blas.OVERRIDE)}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if which == "reference":
        env[blas.DISABLE] = "1"
    elif which == "pip":
        env[blas.OVERRIDE] = "pip"
    else:
        system = next(iter(blas_choice.system_openblases()), None)
        if not system:
            return None
        env[blas.OVERRIDE] = system
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--which", nargs="+", default=["pip", "reference", "system"],
                    choices=["pip", "reference", "system"])
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in args.which:
            env = blas_env(which)
            if env is None:
                print(f"{which:>9}: no system OpenBLAS here, skipped", flush=True)
                continue
            out = Path(tmp) / which
            wall, rss, output = run(train_command(
                "--config", str(REPO / "configs" / "quickstart.yaml"), "--output-dir", str(out),
                "--max-steps", str(args.steps), "--report-every", "2", "--eval-steps", "100000",
                "--num-samples", "0", "--dashboard", "plain"), env)
            notice = next((line for line in output.splitlines()
                           if line.startswith("mlx-tune: using")), "reference BLAS (no preload)")
            results[which] = {"tokens_per_s": round(tokens_per_second(out), 1),
                              "wall_s": round(wall, 1), "blas": notice}
            print(f"{which:>9}: {results[which]['tokens_per_s']:8.1f} tokens/s, "
                  f"{wall:6.1f} s wall  [{notice}]", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
