"""Data-parallel scaling: tokens/second of 1 process and of N local processes.

The same spec (same GLOBAL batch: N ranks train batch/N rows each) runs as one process
and as N ranks on this machine, through the real launchers: ``mlx.launch --backend ring``
for MLX, ``torchrun`` (gloo/nccl) with ``--backend torch``. Throughput is the median of
the per-report tokens/second after the first report (compilation excluded), counted on
rank 0 over the global batch (see common.tokens_per_second). Scaling efficiency is
``tps(N) / (N * tps(1))``: 100% means N processes train N times faster.

    python benchmarks/scaling.py                      # MLX, tiny model, 1 vs 2 ranks
    python benchmarks/scaling.py --backend torch      # torchrun + gloo (CPU)
    python benchmarks/scaling.py --model DIR --batch-size 16 --max-length 512 --steps 60

On a machine with 2 CPU cores (as in CI) this measures the OVERHEAD of data parallelism,
not a speedup: the two ranks share the two cores that the single process uses alone, so
the best possible result is ~50% efficiency (the same tokens/second), and the shortfall
is what the all-reduce, the per-step synchronisation and the smaller per-rank matrix
products cost. (torch on CPU differs: each process takes half the physical cores, so 2
local ranks use twice the threads of 1 process and can look better than 50%.) A speedup
needs ranks with their own hardware: several Macs (mlx.launch --hostfile) or several GPUs
(torchrun --nproc_per_node = GPUs).

Measured on the 2-core CI machine (loaded by other jobs, so noisy), tiny model, 30
steps: MLX 712.8 tokens/s with 1 process, 456.8 with 2 ring ranks: 32% efficiency.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RECIPES, TINY, bench_env, run, tokens_per_second, train_command  # noqa: E402


def free_port_pair() -> int:
    for _ in range(100):
        base, socks = random.randint(20000, 60000), []
        try:
            for port in (base, base + 1):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SystemExit("no free port pair for the ring backend")


def launcher(backend: str, n: int) -> list[str]:
    """What prefixes `python -m mlx_tune train ...` to run it on n local ranks."""
    if n == 1:
        return []
    if backend == "mlx":
        exe = shutil.which("mlx.launch") or sys.exit("mlx.launch is not installed")
        # mlx.launch -n N repeats 127.0.0.1 N times; the ring needs N consecutive ports.
        return [exe, "-n", str(n), "--backend", "ring", "--starting-port",
                str(free_port_pair()), "--"]
    exe = shutil.which("torchrun") or sys.exit("torchrun is not installed")
    return [exe, "--standalone", "--nproc_per_node", str(n)]


def measure(args, n: int, work: Path) -> float:
    out = work / f"ranks-{n}"
    flags = ["--model", args.model, "--data", args.data, "--output-dir", str(out),
             "--force-fresh", "--backend", args.backend, "--max-steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
             "--lora-dropout", "0", "--learning-rate", "1e-4", "--warmup-steps", "0",
             "--report-every", str(args.report_every), "--eval-steps", str(10**9),
             "--no-eval-at-start", "--val-batches", "1", "--checkpoint-interval", str(10**9),
             "--num-samples", "0", "--no-tensorboard", "--dashboard", "plain", "--seed", "0"]
    # Each rank gets its share of the cores for MLX's BLAS, so N ranks use what 1 process
    # used. torch keeps its own default (half the physical cores per process, 1 here):
    # 2 threads on a busy 2-core machine run ~7x slower than 1 (see backends/torch/threads.py).
    threads = str(max(1, (os.cpu_count() or 1) // n))
    cmd = train_command(*flags)
    if n > 1:
        cmd = launcher(args.backend, n) + (cmd if args.backend == "mlx" else cmd[1:])
    env = bench_env()
    env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
    seconds, _, output = run(cmd, env)
    if not (out / "metrics.jsonl").exists() or f"finished {args.steps} steps" not in output:
        # mlx.launch exits 0 even when a rank fails: look at what the run said.
        raise SystemExit(f"{n}-rank run did not finish:\n{output[-3000:]}")
    return tokens_per_second(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("mlx", "torch"), default="mlx")
    ap.add_argument("--model", default=str(TINY))
    ap.add_argument("--data", default=str(RECIPES))
    ap.add_argument("--ranks", type=int, default=2, help="local processes to compare with 1")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (all ranks)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--report-every", type=int, default=5)
    args = ap.parse_args()
    if args.batch_size % args.ranks:
        raise SystemExit(f"--batch-size {args.batch_size} must divide by --ranks {args.ranks}")
    with tempfile.TemporaryDirectory(prefix="mlx-tune-scaling-") as tmp:
        one = measure(args, 1, Path(tmp))
        many = measure(args, args.ranks, Path(tmp))
    cores = os.cpu_count() or 1
    efficiency = many / (args.ranks * one)
    print(f"backend {args.backend}, global batch {args.batch_size}, max_length "
          f"{args.max_length}, {args.steps} steps, {cores} CPU cores")
    print(f"1 process:            {one:9.1f} tokens/s")
    print(f"{args.ranks} local processes:   {many:9.1f} tokens/s  "
          f"(x{many / one:.2f} of 1 process)")
    print(f"scaling efficiency:   {efficiency:9.1%}  (tps({args.ranks}) / ({args.ranks} x tps(1)))")
    if args.backend == "mlx":
        print(f"note: the {args.ranks} ranks share this machine's {cores} cores, which the "
              "single process had to itself, so this measures the OVERHEAD of data "
              f"parallelism, not a speedup: ~{1 / args.ranks:.0%} efficiency (the same "
              "tokens/s) is the ceiling, and the shortfall is what the all-reduce, the "
              "per-step synchronisation and the smaller per-rank matrix products cost. A "
              "speedup needs ranks with their own hardware (several Macs, several GPUs).")
    else:
        print("note: on CPU the torch backend runs each process on half the physical cores "
              f"(1 thread on {cores} cores), so {args.ranks} local ranks use {args.ranks}x the "
              "threads of 1 process: an efficiency near or above 50% here reflects that, not "
              "a data-parallel speedup, and on 2 cores this measures overhead, not scaling. "
              "A speedup needs ranks with their own hardware (several GPUs: torchrun "
              "--nproc_per_node = GPUs).")

if __name__ == "__main__":
    main()
