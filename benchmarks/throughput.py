"""Training throughput: mlx-tune against `mlx_lm lora`, back to back, same everything.

Same model, data, batch size, sequence length, LoRA layers, rank and targets (all linear
layers of every block, mlx-lm's default), no prompt masking (mlx-lm's default), AdamW.
Each trainer runs in its own process (so neither inherits the other's compile cache or
memory), with the same BLAS. Throughput is the median of the per-report tokens/second
after the first report (compilation and warm-up excluded), counted the same way by both:
target tokens of the loss.

    python benchmarks/throughput.py                    # tiny model, shipped data
    python benchmarks/throughput.py --steps 200 --batch-size 8 --max-length 512
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlx_tune.blas import find_openblas  # noqa: E402


def bench_env() -> dict:
    """Both trainers get the same BLAS: the system OpenBLAS when there is one."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    lib = find_openblas()
    if lib and sys.platform.startswith("linux"):
        env["LD_PRELOAD"] = lib
        env["MLX_TUNE_BLAS"] = "openblas"  # already preloaded: mlx-tune need not re-exec
    return env


def run_mlx_lm(args, work: Path, env: dict) -> dict:
    config = work / "mlx_lm.yaml"
    config.write_text(json.dumps({"lora_parameters": {"rank": args.rank, "scale": args.alpha / args.rank,
                                                      "dropout": 0.0}}))
    cmd = [sys.executable, "-m", "mlx_lm", "lora", "--train", "--model", args.model,
           "--data", args.data, "--iters", str(args.steps), "--batch-size", str(args.batch_size),
           "--num-layers", "-1", "--max-seq-length", str(args.max_length),
           "--learning-rate", "1e-4", "--optimizer", "adamw",
           "--steps-per-report", str(args.report_every), "--steps-per-eval", str(10**9),
           "--val-batches", "1", "--save-every", str(10**9), "--seed", "0",
           "--adapter-path", str(work / "mlx_lm_adapters"), "-c", str(config)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"mlx_lm lora failed:\n{out.stderr[-3000:]}")
    text = out.stdout + out.stderr
    tps = [float(x) for x in re.findall(r"Tokens/sec ([\d.]+)", text)]
    peaks = [float(x) for x in re.findall(r"Peak mem ([\d.]+) GB", text)]
    return {"tokens_per_second": statistics.median(tps[1:] or tps),
            "peak_memory_mb": max(peaks) * 1000 if peaks else float("nan")}


def run_mlx_tune(args, work: Path, env: dict) -> dict:
    out_dir = work / "mlx_tune_run"
    cmd = [sys.executable, "-m", "mlx_tune", "train", "--model", args.model, "--data", args.data,
           "--output-dir", str(out_dir), "--force-fresh", "--max-steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--lora-layers", "-1", "--lora-rank", str(args.rank), "--lora-alpha", str(args.alpha),
           "--lora-dropout", "0", "--no-mask-prompt", "--learning-rate", "1e-4",
           "--warmup-steps", "0", "--report-every", str(args.report_every),
           "--eval-steps", str(10**9), "--no-eval-at-start", "--val-batches", "1",
           "--checkpoint-interval", str(10**9), "--num-samples", "0", "--no-tensorboard",
           "--dashboard", "plain", "--seed", "0"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                         stdin=subprocess.DEVNULL)
    if out.returncode:
        raise SystemExit(f"mlx-tune failed:\n{out.stderr[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    # Per report interval: tokens trained over wall time between consecutive reports.
    tps = [(b["trained_tokens"] - a["trained_tokens"]) / (b["wall_time"] - a["wall_time"])
           for a, b in zip(train, train[1:])]
    return {"tokens_per_second": statistics.median(tps[1:] or tps),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in train)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "mlx_tune" / "assets" / "tiny-mistral"))
    p.add_argument("--data", default=str(REPO / "data" / "recipes"))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--report-every", type=int, default=10)
    args = p.parse_args()
    env = bench_env()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ref = run_mlx_lm(args, work, env)
        ours = run_mlx_tune(args, work, env)
    ratio = ours["tokens_per_second"] / ref["tokens_per_second"]
    print(f"model={Path(args.model).name} batch={args.batch_size} max_length={args.max_length} "
          f"rank={args.rank} steps={args.steps} blas={'openblas' if 'LD_PRELOAD' in env else 'bundled'}")
    print(f"{'trainer':<12}{'tokens/s':>12}{'peak MB':>10}")
    print(f"{'mlx_lm lora':<12}{ref['tokens_per_second']:>12.0f}{ref['peak_memory_mb']:>10.0f}")
    print(f"{'mlx-tune':<12}{ours['tokens_per_second']:>12.0f}{ours['peak_memory_mb']:>10.0f}")
    print(f"ratio mlx-tune / mlx_lm = {ratio:.2f}")


if __name__ == "__main__":
    main()
