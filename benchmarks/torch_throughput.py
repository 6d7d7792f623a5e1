"""Training throughput of the torch backend against a plain transformers ``Trainer``.

Same model, same peft LoRA (rank, alpha, dropout, targets), same batch size and sequence
length, same AdamW and clipping, in one process. The contenders take turns in rounds
(ours, Trainer, ours compiled, then the reverse order, ...) and each round's first steps are
warmup, untimed: on a shared machine a neighbour's burst then hits every contender
alike instead of deciding the winner. Reported: target tokens (batch x (seq_len - 1) per
step) per second of wall time, from the median step, and per CPU-second of this process
(``time.process_time``: what a step costs, whoever else is using the machine; on a
loaded 2-core box wall-clock step times swung 5x within a minute), each with its ratio
to the Trainer. On a GPU the wall-clock column is the one that counts.

    python benchmarks/torch_throughput.py                       # the embedded tiny model
    python benchmarks/torch_throughput.py --model DIR --batch-size 8 --seq-len 512 --compile
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSET = ROOT / "mlx_tune" / "assets" / "tiny-mistral"
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def random_batches(vocab: int, batch: int, seq_len: int, n: int, seed: int = 0):
    from mlx_tune.data.batch import Batch

    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq_len), dtype=np.float32)
    mask[:, 0] = 0
    return [Batch(rng.integers(5, vocab, (batch, seq_len)).astype(np.int32), mask)
            for _ in range(n)]


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def durations(ends: list[tuple[float, float]], warmup: int) -> list[tuple[float, float]]:
    """(wall, cpu) seconds of each step after the first ``warmup``."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(ends[warmup - 1:], ends[warmup:])]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    """Our backend; ``round`` runs some steps and returns the timed step durations."""

    def __init__(self, args, compile_: bool = False):
        from mlx_tune.backends.torch.backend import TorchBackend
        from mlx_tune.config.spec import build_spec

        self.backend = TorchBackend()
        self.backend.load(build_spec(overrides={
            "model": args.model, "lora.rank": args.rank, "lora.alpha": 2.0 * args.rank,
            "lora.dropout": 0.05, "lora.targets": TARGETS, "optimizer": "adamw",
            "learning_rate": 1e-4, "grad_clip": 1.0, "batch_size": args.batch_size,
            "torch_compile": compile_, "torch_threads": args.threads}), Path(args.model))

    def round(self, batches, warmup: int) -> list[tuple[float, float]]:
        ends = []
        for batch in batches:
            r = self.backend.step([batch], 1e-4, 0.0)
            self.backend.to_floats([r.loss])  # what a report reads (the step synced already)
            sync(self.backend.device)
            ends.append(clock())
        return durations(ends, warmup)


class HFTrainer:
    """transformers' Trainer on the same model and LoRA; a fresh Trainer each round (its
    construction is outside the timing: steps are timed from callbacks)."""

    def __init__(self, args):
        from peft import LoraConfig, get_peft_model

        from mlx_tune.backends.torch.loading import decoder_layers, default_device, load_base, lora_keys

        self.args, self.device = args, default_device()
        base = load_base(Path(args.model), quantize=None, dtype="auto", device=self.device)
        self.net = get_peft_model(base, LoraConfig(
            r=args.rank, lora_alpha=2.0 * args.rank, lora_dropout=0.05, bias="none",
            target_modules=lora_keys(decoder_layers(base)[0], TARGETS), task_type="CAUSAL_LM"))

    def round(self, batches, warmup: int) -> list[tuple[float, float]]:
        import torch
        from transformers import Trainer, TrainerCallback, TrainingArguments

        rows = [{"input_ids": torch.from_numpy(r).long(), "labels": torch.from_numpy(r).long()}
                for b in batches for r in b.tokens]
        ends, device = [], self.device

        class Clock(TrainerCallback):
            def on_step_end(self, targs, state, control, **kw):
                sync(device)
                ends.append(clock())

        with tempfile.TemporaryDirectory() as out:
            targs = TrainingArguments(
                output_dir=out, per_device_train_batch_size=self.args.batch_size,
                max_steps=len(batches), learning_rate=1e-4, max_grad_norm=1.0,
                lr_scheduler_type="constant", logging_steps=10**9, save_strategy="no",
                report_to=[], disable_tqdm=True, use_cpu=device.type == "cpu",
                bf16=device.type == "cuda", dataloader_num_workers=0, seed=0)
            Trainer(model=self.net, args=targs, train_dataset=rows, callbacks=[Clock()]).train()
        return durations(ends, warmup)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ASSET), help="model directory (default: tiny-mistral)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per contender per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per round (>= 1)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the backend's choice)")
    p.add_argument("--compile", action="store_true", help="also our backend with torch_compile")
    args = p.parse_args(argv)
    args.warmup = max(1, args.warmup)
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"{args.model}: not a model directory (give --model)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from mlx_tune.backends.torch.loading import default_device
    from mlx_tune.models.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(Path(args.model)))
    batches = random_batches(vocab, args.batch_size, args.seq_len, args.warmup + args.steps)
    contenders = {"mlx-tune torch backend": Ours(args), "transformers Trainer": HFTrainer(args)}
    if args.compile:
        contenders["mlx-tune torch_compile"] = Ours(args, compile_=True)
    threads = torch.get_num_threads()  # as the backend set it (or --threads)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    order = list(contenders)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):  # no one always goes first
            times[name] += contenders[name].round(batches, args.warmup)
    tokens = args.batch_size * (args.seq_len - 1)
    rate = {name: tuple(tokens / np.median(np.array(t), axis=0)) for name, t in times.items()}
    wall, cpu = rate["transformers Trainer"]
    print(f"\nmodel {args.model} | {default_device()} | {threads} threads | batch "
          f"{args.batch_size} x seq {args.seq_len} | LoRA r{args.rank} on {','.join(TARGETS)} | "
          f"{args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warmup) each")
    print(f"{'':26}{'tokens/s (wall)':>16}{'vs Trainer':>12}{'tokens/CPU-s':>14}{'vs Trainer':>12}")
    for name, (w, c) in rate.items():
        print(f"{name:26}{w:16.1f}{w / wall:11.2f}x{c:14.1f}{c / cpu:11.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
