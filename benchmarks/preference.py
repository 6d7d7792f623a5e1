"""Preference training cost: mlx-tune DPO against mlx-tune SFT on the same rows, and
against mlx-lm-lora's DPO, one epoch each, rounds alternating.

Three sides, each a fresh child process with the same BLAS (``common.bench_env``):

* ``sft``: mlx-tune SFT on the pairs' 2n sequences (each chosen and each rejected
  answer an example), batch 2 x pairs: the same rows and tokens as DPO's forward, so the
  ratio is the price of the reference pass and the loss (goal: DPO <= 1.6x SFT per pair).
* ``dpo``: mlx-tune ``--objective dpo``, batch ``--batch-size`` pairs (2x rows per
  forward), the reference as the same model with the adapter off.
* ``mlx-lm-lora``: ``mlx_lm_lora.train --train-mode dpo`` from its own virtual
  environment (``--mlx-lm-lora-python``, e.g. /work/venvs/mlxlora/bin/python after
  ``python -m venv /work/venvs/mlxlora && /work/venvs/mlxlora/bin/pip install mlx-lm-lora``),
  with the same OpenBLAS preloaded as ours.
* ``mlx-lm-lora-as-installed``: the same, as a new user gets it on Linux: MLX's bundled
  reference BLAS (mlx-lm-lora does nothing about it; mlx-tune re-executes itself with an
  OpenBLAS, see the README). About 10x slower per step, so it runs on the first
  ``--as-installed-pairs`` pairs (its time per pair is what compares).

What is the same: the model, the pairs (the first ``--pairs`` of data/preference/train.jsonl;
the same prompt and answers, ours as message lists, theirs as the strings its DPO
reads, both through the model's chat template), batch, LoRA rank and scale on every
linear layer of every block, Adam at the same learning rate, sigmoid loss with beta 0.1,
max length, one epoch, the BLAS.

What differs, and why:

* mlx-lm-lora runs only on Apple's Metal: its trainers call
  ``mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])``, a key
  MLX reports only on Metal. On Linux this script starts it through a shim that adds the
  key (the machine's physical memory) to ``mx.device_info()``; nothing else is changed.
* Its reference is a second copy of the model loaded from disk; ours is the same model
  with the LoRA scale at 0 under no gradient.
* It evaluates one validation batch at its first and last iteration whatever
  ``--steps-per-eval`` says; ours evaluates once at the end (``--val-batches 1``).
* Its reported accuracy compares the batch-mean rewards (one number per batch); ours is
  per pair. Only wall time, memory and the adapter are compared here.
* Its batches are drawn at random each iteration (``iterate_dpo_batches`` restarts a
  permutation per call), ours walk a shuffled epoch: the same number of pairs per epoch.
* Epoch time is the training steps only, compilation of the first step included:
  ours from metrics.jsonl (``start`` record to the last ``train`` record), theirs the
  sum of its per-iteration times (its ``it/s``, which leaves out its validation). The
  whole child process (imports, model load, tokenization, the save) is reported too.
* Memory: MLX's peak allocation (``mx.get_peak_memory``, what both report: the arrays,
  so the second model copy shows here) and the child's peak RSS (which also counts the
  libraries each imports: ours imports more at start-up).

"Adapter changed" reads the saved adapter: mlx-lm's LoRA initialises ``lora_b`` to
zeros, so an adapter whose ``lora_b`` are all still zero after an epoch was never
updated (the bug class of mlx-lm-lora #65-#70); for ours the same test on ``lora_b``.

    python benchmarks/preference.py --mlx-lm-lora-python /work/venvs/mlxlora/bin/python
    python benchmarks/preference.py --sides sft,dpo --pairs 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, TINY, bench_env, run, train_command  # noqa: E402

PAIRS = REPO / "data" / "preference" / "train.jsonl"

# Run inside mlx-lm-lora's venv: add the Metal-only key it reads, then its own main.
SHIM = """\
import os, runpy, sys
import mlx.core as mx
_device_info = mx.device_info
def device_info():
    info = dict(_device_info())
    info.setdefault("max_recommended_working_set_size",
                    os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return info
mx.device_info = device_info
sys.argv = ["mlx_lm_lora.train", *sys.argv[1:]]
runpy.run_module("mlx_lm_lora.train", run_name="__main__", alter_sys=True)
"""


def write_data(pairs: list[dict], work: Path) -> dict[str, Path]:
    """The same pairs in each side's format: ours (message lists), SFT rows (each answer
    its own chat), mlx-lm-lora's strings."""
    dirs = {name: work / name for name in ("dpo", "sft", "strings")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    rows = {"dpo": pairs,
            "sft": [{"messages": p["prompt"] + p[k]} for p in pairs for k in ("chosen", "rejected")],
            "strings": [{"prompt": p["prompt"][0]["content"], "chosen": p["chosen"][0]["content"],
                         "rejected": p["rejected"][0]["content"]} for p in pairs]}
    for name, records in rows.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        for split in ("train", "valid"):
            (dirs[name] / f"{split}.jsonl").write_text(text)
    return dirs


def chat_tokens(pairs: list[dict], model: Path) -> int:
    """Tokens in one epoch of the pairs' 2n chats, counted once for every side."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    return sum(len(tok(tok.apply_chat_template(p["prompt"] + p[k], tokenize=False),
                       add_special_tokens=False)["input_ids"])
               for p in pairs for k in ("chosen", "rejected"))


def lora_b_changed(adapter_dir: Path) -> bool:
    from safetensors.numpy import load_file

    files = sorted(adapter_dir.rglob("*.safetensors"))
    if not files:
        raise SystemExit(f"no adapter written under {adapter_dir}")
    weights = load_file(str(files[-1]))
    b = [v for k, v in weights.items() if "lora_b" in k.lower()]
    if not b:
        raise SystemExit(f"{files[-1]}: no lora_b tensors (keys: {sorted(weights)[:4]}...)")
    return any(np.any(v != 0) for v in b)


def ours(args, work: Path, data: Path, objective: str, batch: int, env: dict) -> dict:
    out = work / f"run-{objective}"
    steps = args.pairs * (2 if objective == "sft" else 1) // batch
    wall, rss, _ = run(train_command(
        "--model", str(args.model), "--data", str(data), "--output-dir", str(out), "--force-fresh",
        "--objective", objective, "--max-steps", str(steps), "--batch-size", str(batch),
        "--max-length", str(args.max_length), "--lora-layers", "-1", "--lora-rank", str(args.rank),
        "--lora-alpha", str(args.rank * args.scale), "--lora-dropout", "0",
        "--learning-rate", str(args.learning_rate), "--optimizer", "adam", "--warmup-steps", "0",
        "--report-every", str(steps), "--eval-steps", str(10**9), "--no-eval-at-start",
        "--val-batches", "1", "--checkpoint-interval", str(10**9), "--num-samples", "0",
        "--no-tensorboard", "--dashboard", "plain", "--seed", "0"), env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["type"] == "start")
    last = [r for r in records if r["type"] == "train"][-1]
    return {"epoch_s": last["wall_time"] - start["wall_time"], "process_s": wall,
            "mlx_peak_mb": last["peak_memory_mb"], "peak_rss_mb": rss,
            "changed": lora_b_changed(out / "adapters")}


def as_installed_env(env: dict) -> dict:
    """``env`` without the OpenBLAS preload: what a shell gives mlx-lm-lora on Linux."""
    return {k: v for k, v in env.items()
            if k not in ("LD_PRELOAD", "MLX_TUNE_BLAS", "OPENBLAS_NUM_THREADS")}


def theirs(args, work: Path, data: Path, env: dict, pairs: int) -> dict:
    shim, adapters = work / "shim.py", work / "mlx-lm-lora-adapters"
    shim.write_text(SHIM)
    config = work / "mlx-lm-lora.yaml"
    config.write_text(json.dumps({"lora_parameters": {"rank": args.rank, "scale": args.scale,
                                                      "dropout": 0.0}, "fuse": False}))
    wall, rss, text = run([args.mlx_lm_lora_python, str(shim), "--train", "--train-mode", "dpo",
                        "--model", str(args.model), "--data", str(data),
                        "--batch-size", str(args.batch_size), "--iters", str(pairs // args.batch_size),
                        "--max-seq-length", str(args.max_length), "--num-layers", "-1",
                        "--learning-rate", str(args.learning_rate), "--optimizer", "adam",
                        "--beta", "0.1", "--dpo-cpo-loss-type", "sigmoid", "--seed", "0",
                        "--steps-per-report", "1", "--steps-per-eval", str(10**9),
                        "--val-batches", "1", "--save-every", str(10**9),
                        "--adapter-path", str(adapters), "-c", str(config)], env)
    # "Iter N: loss ..., it/s X, tok/s Y, peak_mem Z GB", one line per iteration.
    reports = re.findall(r"Iter \d+: loss .*?it/s ([\d.]+), .*?peak_mem ([\d.]+)GB", text)
    if len(reports) != pairs // args.batch_size:
        raise SystemExit("could not read mlx-lm-lora's per-iteration reports:\n" + text[-2000:])
    return {"epoch_s": sum(1.0 / float(it_s) for it_s, _ in reports), "process_s": wall,
            "mlx_peak_mb": max(float(gb) for _, gb in reports) * 1000, "peak_rss_mb": rss,
            "changed": lora_b_changed(adapters)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=TINY)
    p.add_argument("--pairs", type=int, default=32, help="the first N pairs of the shipped set")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=4.0, help="LoRA scale (alpha / rank)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of every side")
    p.add_argument("--sides", default="sft,dpo,mlx-lm-lora,mlx-lm-lora-as-installed")
    p.add_argument("--mlx-lm-lora-python", default="/work/venvs/mlxlora/bin/python")
    p.add_argument("--as-installed-pairs", type=int, default=8,
                   help="pairs for the mlx-lm-lora-as-installed side (its own data directory)")
    args = p.parse_args()
    sides = args.sides.split(",")
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()[:args.pairs]]
    if len(pairs) < args.pairs or args.pairs % args.batch_size:
        raise SystemExit(f"--pairs must be a multiple of --batch-size, at most {len(pairs)}")
    tokens = chat_tokens(pairs, args.model)
    env = bench_env()
    results: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(pairs, Path(tmp))
        few = write_data(pairs[:args.as_installed_pairs], Path(tmp) / "few")["strings"]
        for i in range(args.rounds):
            # Alternate the order as well as the sides, so neither always runs first.
            for side in (sides if i % 2 == 0 else sides[::-1]):
                work = Path(tmp) / f"{side}-{i}"
                work.mkdir()
                if side == "mlx-lm-lora":
                    results[side].append(theirs(args, work, data["strings"], env, args.pairs))
                elif side == "mlx-lm-lora-as-installed":
                    results[side].append(theirs(args, work, few, as_installed_env(env),
                                                args.as_installed_pairs))
                else:
                    batch = args.batch_size * (2 if side == "sft" else 1)
                    results[side].append(ours(args, work, data[side], side, batch, env))
                r = results[side][-1]
                results[side][-1]["pairs"] = (args.as_installed_pairs if side.endswith("installed")
                                              else args.pairs)
                print(f"round {i} {side:<25} epoch {r['epoch_s']:7.1f} s, process {r['process_s']:6.1f} s, "
                      f"MLX peak {r['mlx_peak_mb']:5.0f} MB, RSS {r['peak_rss_mb']:5d} MB, "
                      f"adapter changed: {r['changed']}", flush=True)
    best = {side: min(rs, key=lambda r: r["epoch_s"]) for side, rs in results.items()}
    print(f"\nmodel={args.model.name} pairs={args.pairs} batch={args.batch_size} pairs "
          f"rank={args.rank} max_length={args.max_length} rounds={args.rounds} "
          f"tokens/epoch={tokens} blas={env.get('MLX_TUNE_BLAS', 'bundled')} cpus={os.cpu_count()}")
    print(f"{'side':<26}{'s/epoch':>9}{'tokens/s':>10}{'s/pair':>8}{'process s':>11}"
          f"{'MLX peak MB':>13}{'RSS MB':>8}  adapter changed")
    for side, r in best.items():
        share = r["pairs"] / args.pairs  # the as-installed side runs on fewer pairs
        print(f"{side:<26}{r['epoch_s'] / share:>9.1f}{tokens / (r['epoch_s'] / share):>10.0f}"
              f"{r['epoch_s'] / r['pairs']:>8.2f}{r['process_s']:>11.1f}{r['mlx_peak_mb']:>13.0f}"
              f"{r['peak_rss_mb']:>8d}  {r['changed']}")
    if "dpo" in best and "sft" in best:
        print(f"DPO / SFT time per pair = {best['dpo']['epoch_s'] / best['sft']['epoch_s']:.2f} "
              "(goal <= 1.6)")
    for peer in ("mlx-lm-lora", "mlx-lm-lora-as-installed"):
        if "dpo" in best and peer in best:
            per_pair = {s: best[s]["epoch_s"] / best[s]["pairs"] for s in ("dpo", peer)}
            print(f"{peer} / mlx-tune DPO time per epoch = {per_pair[peer] / per_pair['dpo']:.2f} "
                  f"(goal >= 3); MLX peak {best['dpo']['mlx_peak_mb']:.0f} vs "
                  f"{best[peer]['mlx_peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
