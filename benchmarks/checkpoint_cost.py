"""What a checkpoint costs: save time and size against the time of one training step.

Measured in one process on the tiny model, for LoRA (what users checkpoint every few
hundred steps) and full fine-tuning (every weight plus two Adam moments).

    python benchmarks/checkpoint_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlx_tune.system.blas import maybe_reexec_with_openblas  # noqa: E402


def measure(fine_tune_type: str, args) -> dict:
    from mlx_tune.backends.mlx.backend import MLXBackend
    from mlx_tune.checkpoint.manager import CheckpointManager
    from mlx_tune.data import load_data
    from mlx_tune.config.spec import build_spec

    spec = build_spec(overrides={"model": args.model, "data": args.data, "batch_size": 8,
                                 "max_length": 256, "fine_tune_type": fine_tune_type,
                                 "learning_rate": 1e-4, "prefetch": 0})
    backend = MLXBackend()
    backend.load(spec, spec.model)
    data = load_data(spec, backend.tokenizer, log=lambda m: None)
    batches = [data.train.next_batch() for _ in range(args.steps + 3)]
    for batch in batches[:3]:  # compile and warm up
        backend.to_floats([backend.step([batch], 1e-4, 0.0).loss])
    step_times = []
    for batch in batches[3:]:
        tic = time.perf_counter()
        backend.to_floats([backend.step([batch], 1e-4, 0.0).loss])
        step_times.append(time.perf_counter() - tic)
    save_times, size = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        manager = CheckpointManager(Path(tmp), backend.codec, keep=2, log=lambda m: None)
        for i in range(args.saves):
            arrays, meta = backend.state_dict()
            tic = time.perf_counter()
            path = manager.save(i + 1, arrays, {**meta, "fingerprint": {}})
            save_times.append(time.perf_counter() - tic)
            size = sum(f.stat().st_size for f in path.iterdir())
    data.close()
    step, save = statistics.median(step_times), statistics.median(save_times)
    return {"type": fine_tune_type, "step_ms": step * 1e3, "save_ms": save * 1e3,
            "size_mb": size / 2**20, "ratio": save / step}


def main() -> None:
    import os
    os.chdir(REPO)  # so the re-exec below finds `python -m benchmarks.checkpoint_cost`
    maybe_reexec_with_openblas(sys.argv[1:], module="benchmarks.checkpoint_cost")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "mlx_tune" / "assets" / "tiny-mistral"))
    p.add_argument("--data", default=str(REPO / "data" / "recipes"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--saves", type=int, default=5)
    args = p.parse_args()
    print(f"{'fine-tune':<10}{'step ms':>10}{'save ms':>10}{'size MB':>10}{'save/step':>11}")
    for kind in ("lora", "full"):
        r = measure(kind, args)
        print(f"{r['type']:<10}{r['step_ms']:>10.1f}{r['save_ms']:>10.1f}{r['size_mb']:>10.2f}"
              f"{r['ratio']:>11.2f}")


if __name__ == "__main__":
    main()
