"""Training throughput: mlx-tune against `mlx_lm lora`, back to back, same everything.

Same model, data, batch size, sequence length, LoRA layers, rank and targets (all linear
layers of every block, mlx-lm's default), no prompt masking (mlx-lm's default), AdamW.
Each trainer runs in its own process (so neither inherits the other's compile cache or
memory), with the same BLAS. Throughput is the median of the per-report tokens/second
after the first report (compilation and warm-up excluded), counted the same way by both:
target tokens of the loss; the trainers alternate for --rounds rounds and each side's best
round is kept.

    python benchmarks/throughput.py                    # tiny model, shipped data
    python benchmarks/throughput.py --steps 200 --batch-size 8 --max-length 512
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RECIPES, TINY, bench_env, run, tokens_per_second, train_command  # noqa: E402


def run_mlx_lm(args, work: Path, env: dict) -> dict:
    config = work / "mlx_lm.yaml"
    config.write_text(json.dumps({"lora_parameters": {"rank": args.rank,
                                                      "scale": args.alpha / args.rank,
                                                      "dropout": 0.0}}))
    cmd = [sys.executable, "-m", "mlx_lm", "lora", "--train", "--model", args.model,
           "--data", args.data, "--iters", str(args.steps), "--batch-size", str(args.batch_size),
           "--num-layers", "-1", "--max-seq-length", str(args.max_length),
           "--learning-rate", "1e-4", "--optimizer", "adamw",
           "--steps-per-report", str(args.report_every), "--steps-per-eval", str(10**9),
           "--val-batches", "1", "--save-every", str(10**9), "--seed", "0",
           "--adapter-path", str(work / "mlx_lm_adapters"), "-c", str(config)]
    _, rss, text = run(cmd, env)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    # mlx-lm >= 0.31 prints a table row per report: "iter  train_loss [trend]  tok/s  tokens";
    # older versions print "Tokens/sec N". Accept both.
    tps = [float(x.replace(",", "")) for x in
           re.findall(r"^\s*\d+\s+[\d.]+\s*\S?\s+([\d,]+)\s+[\d.]+k?\s*$", text, re.M)]
    tps = tps or [float(x) for x in re.findall(r"Tokens/sec ([\d.]+)", text)]
    if not tps:
        raise SystemExit("could not read mlx_lm's throughput:\n" + text[-2000:])
    return {"tokens_per_second": statistics.median(tps[1:] or tps), "peak_rss_mb": rss}


def run_mlx_tune(args, work: Path, env: dict) -> dict:
    out_dir = work / "mlx_tune_run"
    _, rss, _ = run(train_command(
        "--model", args.model, "--data", args.data, "--output-dir", str(out_dir), "--force-fresh",
        "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--max-length", str(args.max_length), "--lora-layers", "-1", "--lora-rank", str(args.rank),
        "--lora-alpha", str(args.alpha), "--lora-dropout", "0", "--no-mask-prompt",
        "--learning-rate", "1e-4", "--warmup-steps", "0", "--report-every", str(args.report_every),
        "--eval-steps", str(10**9), "--no-eval-at-start", "--val-batches", "1",
        "--checkpoint-interval", str(10**9), "--num-samples", "0", "--no-tensorboard",
        "--dashboard", "plain", "--seed", "0"), env)
    return {"tokens_per_second": tokens_per_second(out_dir), "peak_rss_mb": rss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(TINY))
    p.add_argument("--data", default=str(RECIPES))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--report-every", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each trainer")
    args = p.parse_args()
    env = bench_env()
    # Alternate A/B rounds and keep each side's best: other load on the machine only ever
    # slows a run down, so the best round is the least disturbed measurement of each.
    refs, ourss = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            work = Path(tmp) / str(i)
            work.mkdir()
            refs.append(run_mlx_lm(args, work, env))
            ourss.append(run_mlx_tune(args, work, env))
    ref = max(refs, key=lambda r: r["tokens_per_second"])
    ours = max(ourss, key=lambda r: r["tokens_per_second"])
    ratio = ours["tokens_per_second"] / ref["tokens_per_second"]
    print(f"model={Path(args.model).name} batch={args.batch_size} max_length={args.max_length} "
          f"rank={args.rank} steps={args.steps} rounds={args.rounds} blas={'openblas' if 'LD_PRELOAD' in env else 'bundled'}")
    print(f"{'trainer':<12}{'tokens/s':>12}{'peak RSS MB':>13}")
    print(f"{'mlx_lm lora':<12}{ref['tokens_per_second']:>12.0f}{ref['peak_rss_mb']:>13.0f}")
    print(f"{'mlx-tune':<12}{ours['tokens_per_second']:>12.0f}{ours['peak_rss_mb']:>13.0f}")
    print(f"ratio mlx-tune / mlx_lm = {ratio:.2f}")


if __name__ == "__main__":
    main()
