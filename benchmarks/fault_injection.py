"""Kill a training run with SIGKILL at N random moments and check every resume.

One reference run goes uninterrupted. Then chains of runs share an output directory:
each is started with --auto-resume and killed at a random moment (mid-step, mid-eval,
mid-save: wherever the clock lands; a share of the kills wait for the final checkpoint
to be half written and land there), until the chain is allowed to finish. With the
default of one kill per chain, every kill has its own outcome. Reported:
- resumes that ended bit-identical to the reference (final adapter weights),
- corrupt checkpoints loaded (the checkpoint a resume started from fails validation
  afterwards): must be 0,
- steps lost per kill (last step logged before the kill minus the step resumed from).

    python benchmarks/fault_injection.py               # 50 kills, each its own chain
    python benchmarks/fault_injection.py --kills 10 --per-chain 5
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RECIPES, TINY, bench_env, train_command  # noqa: E402

from mlx_tune.checkpoint.manager import CheckpointCorrupt, CheckpointManager, NumpyCodec  # noqa: E402

SPEC = """model: {model}
data: {data}
batch_size: 4
max_length: 128
max_steps: {steps}
learning_rate: 1.0e-3
warmup_steps: 2
lora: {{rank: 4, dropout: 0.05}}
checkpoint_interval: 3
eval_steps: 10
val_batches: 1
report_every: 1
num_samples: 0
prefetch: 2
dashboard: plain
early_stopping: {{warmup: 100000}}
"""


def command(config: Path, out: Path) -> list[str]:
    return train_command("--config", str(config), "--output-dir", str(out), "--auto-resume")


def last_logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [0]
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("type") == "train":
            steps.append(record["step"])
    return max(steps)


def wait_for_final_save(out: Path, steps: int, proc: subprocess.Popen) -> int:
    """Wait until the last step's checkpoint has a shard on disk but no manifest yet
    (1), or the run ended first (0)."""
    pattern = f".tmp-step-{steps:07d}-*/arrays-*.safetensors"
    while proc.poll() is None:
        if any((out / "checkpoints").glob(pattern)):
            return 1
        time.sleep(0.002)
    return 0


def resumed_from(text: str) -> tuple[int, Path | None]:
    match = re.search(r"resuming from step (\d+) \((.+?)\)", text)
    return (int(match.group(1)), Path(match.group(2))) if match else (0, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--per-chain", type=int, default=1, help="kills before a chain may finish")
    p.add_argument("--final-save-share", type=float, default=0.2,
                   help="share of kills that land while the final checkpoint is written")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=str(TINY))
    p.add_argument("--data", default=str(RECIPES))
    args = p.parse_args()
    rng = random.Random(args.seed)
    env = bench_env()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = tmp / "spec.yaml"
        config.write_text(SPEC.format(model=args.model, data=args.data, steps=args.steps))
        tic = time.time()
        subprocess.run(command(config, tmp / "reference"), env=env, check=True,
                       capture_output=True, stdin=subprocess.DEVNULL)
        duration = time.time() - tic
        reference = load_file(str(tmp / "reference" / "adapters" / "adapters.safetensors"))

        kills, lost, corrupt_loaded, identical, chains, unchecked = 0, [], 0, 0, 0, 0
        final_save_kills = 0

        def account(text: str, before: int | None) -> None:
            """Book the resume a run's log shows: the checkpoint it loaded must validate
            (checked now, before retention may prune it), and the previous kill cost
            the steps between the last one logged and the step resumed from."""
            nonlocal corrupt_loaded, unchecked
            step, path = resumed_from(text)
            if path is not None:
                try:
                    CheckpointManager(path.parent, NumpyCodec(), log=lambda m: None).validate(path)
                except CheckpointCorrupt:
                    if path.exists():
                        corrupt_loaded += 1
                    else:
                        unchecked += 1  # pruned or replaced since it was loaded
            if before is not None:  # no resume line: it started from step 0
                lost.append(max(0, before - step))

        while kills < args.kills:
            chains += 1
            out = tmp / f"chain-{chains}"
            before: int | None = None
            for _ in range(min(args.per_chain, args.kills - kills)):
                log = tmp / "run.log"
                at_final_save = rng.random() < args.final_save_share
                # save_sleep pauses each checkpoint between its shards and its manifest
                # (timing only: the numbers are unchanged), so the kill lands mid-save.
                run_env = {**env, "MLX_TUNE_FAULTS": "save_sleep=0.3"} if at_final_save else env
                with open(log, "w") as f:
                    proc = subprocess.Popen(command(config, out), env=run_env, stdout=f,
                                            stderr=f, stdin=subprocess.DEVNULL)
                    if at_final_save:
                        final_save_kills += wait_for_final_save(out, args.steps, proc)
                    else:
                        time.sleep(rng.uniform(0.0, duration))
                    if proc.poll() is not None:  # finished before the kill landed
                        break
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                kills += 1
                account(log.read_text(), before)
                before = last_logged_step(out)
            done = subprocess.run(command(config, out), env=env, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL)
            account(done.stdout + done.stderr, before)
            final = load_file(str(out / "adapters" / "adapters.safetensors"))
            same = done.returncode == 0 and all(np.array_equal(final[k], reference[k])
                                                for k in reference)
            identical += same
            print(f"chain {chains}: {'bit-identical' if same else 'DIFFERENT'} "
                  f"(kills so far {kills})", flush=True)
    print(f"\nkills: {kills} in {chains} chains of up to {args.per_chain} "
          f"({final_save_kills} while the final checkpoint was being written)")
    print(f"chains ending bit-identical to the uninterrupted run: {identical}/{chains}")
    print(f"corrupt checkpoints loaded: {corrupt_loaded} (not checkable, pruned before the "
          f"check: {unchecked})")
    print(f"steps lost per kill: mean {statistics.mean(lost):.2f}, max {max(lost)} over "
          f"{len(lost)} kills (checkpoint_interval 3)")


if __name__ == "__main__":
    main()
