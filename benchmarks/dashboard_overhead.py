"""What the live dashboard costs the training loop: tokens/second with the rich
dashboard on a (pseudo) terminal against plain lines, alternating A/B/A/B so that
machine noise falls on both sides.

    python benchmarks/dashboard_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RECIPES, TINY, bench_env, run, tokens_per_second, train_command  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(TINY))
    p.add_argument("--data", default=str(RECIPES))
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    env = bench_env()
    results: dict[str, list[float]] = {"rich": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for mode in ("rich", "plain"):
                out = Path(tmp) / f"{mode}-{i}"
                run(train_command("--model", args.model, "--data", args.data, "--output-dir",
                                  str(out), "--force-fresh", "--max-steps", str(args.steps),
                                  "--batch-size", "8", "--max-length", "256",
                                  "--report-every", "1", "--eval-steps", str(10**9),
                                  "--no-eval-at-start", "--checkpoint-interval", str(10**9),
                                  "--num-samples", "0", "--no-tensorboard", "--dashboard", mode),
                    env, tty=True)
                results[mode].append(tokens_per_second(out))
    rich, plain = statistics.median(results["rich"]), statistics.median(results["plain"])
    print(f"tokens/s  rich dashboard {rich:.0f}  plain lines {plain:.0f}  "
          f"ratio {rich / plain:.3f} (report every step, {args.rounds} rounds each)")


if __name__ == "__main__":
    main()
