"""One epoch of long-tail chat data: bounded buckets, packing, the old align32 batching
and `mlx_lm lora`, in alternating rounds; plus FLOPs of packed vs padded at 7B size.

    python benchmarks/packing.py --records 240 --rounds 2

Wall time is the whole child process (load, tokenize, compile, one epoch) for every
contender. Real tokens are the non-padding tokens of the epoch; padding fraction and
shapes come from mlx-tune's own data layer (the batches the epoch really has) and its
metrics.jsonl (`compiled_shapes`, counted at the compiled entry points).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TINY, bench_env, run, train_command, train_records  # noqa: E402

WORDS = ("flour eggs milk butter sugar salt pan oven whisk bake stir boil roast garlic "
         "tomato soup pepper onion simmer slice knead dough yeast rest").split()
# Hermes-2-Pro-Mistral-7B: hidden, layers, intermediate, heads, kv heads, vocab
HERMES = dict(d=4096, layers=32, ff=14336, heads=32, kv=8, vocab=32032)


def make_data(out: Path, records: int, max_length: int, seed: int = 0) -> None:
    """Deterministic long tail: answer lengths lognormal (median ~ a few hundred tokens),
    clipped at max_length, so a few records are truncated."""
    rng = np.random.default_rng(seed)
    # ~1.4 tokens a word with tiny-mistral's tokenizer: median ~max_length / 3 tokens.
    words = np.minimum(rng.lognormal(np.log(max_length / 4.5), 0.7, records), max_length)
    rows = []
    for i, n in enumerate(words.astype(int)):
        answer = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(max(1, n)))
        rows.append({"messages": [{"role": "user", "content": f"Recipe {i}, please."},
                                  {"role": "assistant", "content": answer}]})
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows), ("valid", rows[:8])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def epoch_batches(data: Path, args, **over):
    """The epoch's batches as mlx-tune makes them (no model needed)."""
    from mlx_tune.config.spec import build_spec
    from mlx_tune.data import load_data
    from mlx_tune.models.tokenizer import load_tokenizer
    spec = build_spec(overrides={"data": str(data), "batch_size": args.batch_size,
                                 "max_length": args.max_length, "prefetch": 0, **over})
    bundle = load_data(spec, load_tokenizer(Path(args.model)), log=lambda m: None)
    return [bundle.train.next_batch() for _ in range(bundle.train.steps_per_epoch())]


def real_tokens(batch) -> int:
    """Non-padding tokens: a packed row's segment tokens; a padded row's tokens up to its
    last non-pad token (the tiny model's pad id is 3)."""
    if batch.segments is not None:
        return int((batch.segments > 0).sum())
    pad = 3
    return int(sum(len(r) - int(np.argmax(r[::-1] != pad)) if (r != pad).any() else 0
                   for r in batch.tokens))


def flops(batches, dims=HERMES) -> float:
    """Forward+backward FLOPs (x3 forward) of the batches at `dims`: 2 x weights per token
    in the dense layers, plus dense attention over each row's full width (a block mask
    computes the whole T x T score matrix)."""
    d, L = dims["d"], dims["layers"]
    head = d // dims["heads"]
    weights = L * (2 * d * d + 2 * d * dims["kv"] * head + 3 * d * dims["ff"]) + d * dims["vocab"]
    total = 0.0
    for b in batches:
        rows, width = b.tokens.shape
        total += rows * width * 2 * weights + rows * L * 4 * width * width * d
    return 3 * total


def mlx_tune(args, data: Path, work: Path, env: dict, name: str, *flags: str) -> dict:
    out = work / name
    wall, _, _ = run(train_command(
        "--model", args.model, "--data", str(data), "--output-dir", str(out), "--force-fresh",
        "--num-epochs", "1", "--batch-size", str(args.batch_size),
        "--max-length", str(args.max_length), "--lora-layers", str(args.layers),
        "--lora-rank", str(args.rank), "--lora-dropout", "0", "--mask-prompt",
        "--learning-rate", "1e-4", "--warmup-steps", "0", "--report-every", "1000000",
        "--eval-steps", str(10**9), "--no-eval-at-start", "--val-batches", "0",
        "--checkpoint-interval", str(10**9), "--num-samples", "0", "--no-tensorboard",
        "--dashboard", "plain", "--prefetch", "2", "--seed", "0", *flags), env)
    last = train_records(out)[-1]
    return {"wall": wall, "shapes": last["compiled_shapes"], "steps": last["step"]}


def mlx_lm(args, data: Path, work: Path, env: dict, steps: int) -> dict:
    config = work / "mlx_lm.yaml"
    config.write_text(json.dumps({"lora_parameters": {"rank": args.rank, "scale": 20.0,
                                                      "dropout": 0.0}}))
    wall, _, _ = run([sys.executable, "-m", "mlx_lm", "lora", "--train", "--model", args.model,
                      "--data", str(data), "--iters", str(steps),
                      "--batch-size", str(args.batch_size), "--num-layers", str(args.layers),
                      "--max-seq-length", str(args.max_length), "--mask-prompt",
                      "--learning-rate", "1e-4", "--steps-per-report", "1000000",
                      "--steps-per-eval", str(10**9), "--val-batches", "1",
                      "--save-every", str(10**9), "--seed", "0",
                      "--adapter-path", str(work / "mlx_lm_adapters"), "-c", str(config)], env)
    return {"wall": wall, "shapes": None, "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(TINY))
    p.add_argument("--records", type=int, default=240)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=-1)
    args = p.parse_args()
    env = bench_env()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        make_data(data, args.records, args.max_length)
        views = {"bounded": epoch_batches(data, args),
                 "packed": epoch_batches(data, args, packing=True),
                 "align32": epoch_batches(data, args, bucket_widths="align32")}
        real = {k: sum(real_tokens(b) for b in v) for k, v in views.items()}
        slots = {k: sum(b.tokens.size for b in v) for k, v in views.items()}
        steps = len(views["bounded"])
        runs = {"bounded": ("--bucket-widths", "auto"), "packed": ("--packing",),
                "align32": ("--bucket-widths", "align32")}
        walls: dict[str, list[float]] = {k: [] for k in [*runs, "mlx_lm lora"]}
        shapes: dict[str, int | None] = {}
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for name in order:
                res = mlx_tune(args, data, work, env, name, *runs[name])
                walls[name].append(res["wall"])
                shapes[name] = res["shapes"]
            walls["mlx_lm lora"].append(mlx_lm(args, data, work, env, steps)["wall"])
            shapes["mlx_lm lora"] = None
    ref = statistics.median(walls["mlx_lm lora"])
    print(f"{args.records} records, batch {args.batch_size}, max_length {args.max_length}, "
          f"{args.rounds} rounds; one epoch = {steps} steps (bounded/align32)")
    print(f"{'contender':<14}{'wall s':>9}{'real tok/s':>12}{'padding':>9}{'shapes':>8}"
          f"{'vs mlx_lm':>11}")
    for name, w in walls.items():
        key = name if name in views else "align32"  # mlx_lm pads to multiples of 32 too
        wall = statistics.median(w)
        pad = 1 - real[key] / slots[key]
        print(f"{name:<14}{wall:>9.1f}{real[key] / wall:>12.0f}{100 * pad:>8.1f}%"
              f"{shapes[name] if shapes[name] is not None else '-':>8}{ref / wall:>10.2f}x")
    f = {k: flops(v) for k, v in views.items()}
    print("FLOPs of this epoch at Hermes-2-Pro-Mistral-7B dimensions (fwd+bwd, dense "
          "attention over each row):")
    for k, v in f.items():
        print(f"  {k:<10}{v / 1e15:8.2f} PFLOP  ({v / f['bounded']:.2f}x bounded)")


if __name__ == "__main__":
    main()
