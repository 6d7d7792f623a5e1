"""Peak and resident memory of a training step at 7-8B dimensions, against the planner.

    python benchmarks/memory.py                      # the default matrix (see MATRIX)
    python benchmarks/memory.py --only 2L-512        # configurations whose name contains this
    python benchmarks/memory.py --kernels            # the quantized-matmul profile only

Each configuration runs in its own process (a clean peak and resident set) on a
random-weight model from ``hermes_shape.py`` (Hermes-2-Pro-Mistral-7B blocks, or Llama-3-8B's
128k vocabulary), through the product's own MLX backend: ``MLXBackend.load`` then
``MLXBackend.step`` on one random batch of the configuration's width, twice (the first
compiles). Printed per configuration: the peak over both steps (``mx.get_peak_memory``),
resident memory after them (MLX active + cache, and the process's VmRSS / VmHWM), the
planner's prediction (``estimate``) and its error, seconds per step, and achieved FLOP/s
against a matmul of the block's own dimensions ([tokens, hidden] x [hidden, MLP width], in
the step's dtype) timed in the same process before and after the steps.

Model FLOPs of a LoRA step (forward plus backward through the activations; frozen weights
get no gradient): 2 x forward of every linear layer and the head (forward, then the input
gradient), 3 x forward of the attention products (QK^T and PV, the full T x T square MLX
computes; backward needs four products), the adapters 3 x theirs. Gradient checkpointing
and the chunked loss recompute work that is not counted: their cost shows as a lower rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, bench_env  # noqa: E402
from hermes_shape import write_model  # noqa: E402


@dataclass(frozen=True)
class Config:
    shape: str = "hermes"
    layers: int = 2
    dtype: str = "float32"
    quantize: int | None = None
    length: int = 512
    batch: int = 1
    checkpointing: bool = False
    chunked: bool = False
    fine_tune: str = "lora"
    steps: int = 2

    @property
    def name(self) -> str:
        bits = f"q{self.quantize}" if self.quantize else {"float32": "fp32",
                                                          "bfloat16": "bf16"}[self.dtype]
        return (f"{self.shape}-{self.layers}L-{bits}-{self.batch}x{self.length}"
                f"{'-ckpt' if self.checkpointing else ''}{'-chunked' if self.chunked else ''}"
                f"{'-dora' if self.fine_tune == 'dora' else ''}")


BASE = Config()
ONE = replace(BASE, layers=1, steps=1)
# Ordered by what the planner needs first: 512/1024 tokens give the per-token terms, one
# and two layers the per-layer slope; speed pairs run two steps and time the second. On a
# quiet 2-core machine a 1-layer float32 step of 512 tokens takes under a minute (2-6 under
# load); MLX's CPU bfloat16 and 4-bit matmuls run at ~1 GFLOP/s (--kernels), so those run
# 64 tokens.
MATRIX = [
    replace(ONE, steps=2), replace(ONE, steps=2, chunked=True),
    replace(ONE, length=1024), replace(ONE, length=1024, chunked=True),
    replace(BASE, steps=1),
    replace(ONE, shape="llama3", length=256), replace(ONE, shape="llama3", length=256, chunked=True),
    replace(ONE, dtype="bfloat16", quantize=4, length=64),
    replace(ONE, dtype="bfloat16", length=64),
    replace(ONE, fine_tune="dora"),
    replace(ONE, length=1024, checkpointing=True),
    replace(ONE, length=1024, checkpointing=True, chunked=True),
]


# -- FLOPs ---------------------------------------------------------------------------

def step_flops(cfg: dict, c: Config, rank: int = 8) -> float:
    """Model FLOPs of one LoRA step (see the module docstring)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    tokens, T = c.batch * c.length, c.length
    dims = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    linear = 2 * tokens * sum(a * b for a, b in dims)
    adapters = 2 * tokens * sum(rank * (a + b) for a, b in dims)
    attention = 2 * 2 * tokens * T * q
    per_layer = 2 * linear + 3 * adapters + 3 * attention
    return c.layers * per_layer + 2 * (2 * tokens * h * v)


# -- the child: one configuration in a fresh process ----------------------------------

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _matmul_rate(mx, c: Config, hidden: int, width: int) -> float:
    """FLOP/s of [rows, hidden] x [hidden, width] in the step's dtype (rows capped: the
    rate, not the size, is what is compared)."""
    rows = min(c.batch * c.length, 256)
    dtype = mx.float32 if c.dtype == "float32" else mx.bfloat16
    x = mx.random.normal((rows, hidden)).astype(dtype)
    w = (0.02 * mx.random.normal((width, hidden))).astype(dtype)
    mx.eval(x, w)
    mx.eval(x @ w.T)
    tic = time.perf_counter()
    mx.eval(x @ w.T)
    return 2 * rows * hidden * width / (time.perf_counter() - tic)


def child(c: Config, model_dir: Path) -> dict:
    import mlx.core as mx
    import numpy as np

    from mlx_tune.backends.mlx.backend import MLXBackend
    from mlx_tune.config.schema import leaf_fields
    from mlx_tune.config.spec import build_spec
    from mlx_tune.data.batch import Batch

    overrides = {"model": str(model_dir), "dtype": c.dtype, "quantize": c.quantize,
                 "fine_tune_type": c.fine_tune, "gradient_checkpointing": c.checkpointing,
                 "max_length": c.length, "batch_size": c.batch, "lora.dropout": 0.0,
                 "num_samples": 0, "warmup_steps": 0}
    if any(name == "memory.chunked_loss" for name, *_ in leaf_fields()):
        overrides["memory.chunked_loss"] = c.chunked
    elif c.chunked:
        raise SystemExit("this tree has no memory.chunked_loss key")
    spec = build_spec(overrides=overrides)
    cfg = json.loads((model_dir / "config.json").read_text())
    rate_before = _matmul_rate(mx, c, cfg["hidden_size"], cfg["intermediate_size"])
    backend = MLXBackend()
    backend.load(spec, model_dir)
    # mlx-lm loads lazily: materialise the (converted, quantized) weights now, so the
    # step's peak is the step's, not the loading's (reported apart).
    mx.eval(backend.model.parameters())
    load_peak = mx.get_peak_memory()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1024, size=(c.batch, c.length)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=np.float32)
    mask[:, 0] = 0
    batch = Batch(tokens=tokens, mask=mask)
    mx.reset_peak_memory()
    seconds = []
    for _ in range(c.steps):
        tic = time.perf_counter()
        result = backend.step([batch], 1e-5, 0.0)
        mx.eval(result.loss, backend.step_fn.state)  # the update done, not just queued
        seconds.append(time.perf_counter() - tic)
    loss = float(np.array(result.loss))
    out = {"peak": mx.get_peak_memory(), "active": mx.get_active_memory(),
           "cache": mx.get_cache_memory(), "rss": _status_kb("VmRSS") * 1024,
           "hwm": _status_kb("VmHWM") * 1024, "seconds": seconds, "loss": loss,
           "load_peak": load_peak}
    out["matmul_flops"] = (rate_before + _matmul_rate(mx, c, cfg["hidden_size"],
                                                      cfg["intermediate_size"])) / 2
    return out


# -- the parent: predictions, children, the table -------------------------------------

def prediction(model_dir: Path, c: Config) -> float:
    from mlx_tune.training.planner import ModelShape, estimate
    from mlx_tune.config.spec import build_spec
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    spec = build_spec(overrides={"model": str(model_dir), "dtype": c.dtype,
                                 "quantize": c.quantize, "fine_tune_type": c.fine_tune,
                                 "gradient_checkpointing": c.checkpointing,
                                 "max_length": c.length, "batch_size": c.batch,
                                 "lora.dropout": 0.0, **_chunk_override(c)})
    return estimate(shape, spec, c.batch, c.length, 1, "mlx").total


def _chunk_override(c: Config) -> dict:
    from mlx_tune.config.schema import leaf_fields
    has = any(name == "memory.chunked_loss" for name, *_ in leaf_fields())
    return {"memory.chunked_loss": c.chunked} if has else {}


def run_config(c: Config, models: Path, env: dict) -> dict:
    model_dir = write_model(c.shape, c.layers, models / f"{c.shape}-{c.layers}l")
    cmd = [sys.executable, __file__, "--child", json.dumps(asdict(c)),
           "--model-dir", str(model_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        return {"name": c.name, "error": (proc.stderr or proc.stdout).strip()[-400:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = json.loads((model_dir / "config.json").read_text())
    predicted = prediction(model_dir, c)
    step_s = out["seconds"][-1]
    flops = step_flops(cfg, c) / step_s
    return {"name": c.name, "config": asdict(c), **out, "predicted": predicted,
            "error_pct": 100 * (predicted - out["peak"]) / out["peak"],
            "tokens_per_s": c.batch * c.length / step_s, "step_flops": flops,
            "flops_ratio": flops / out["matmul_flops"]}


HEADER = (f"{'configuration':38} {'peak MB':>8} {'plan MB':>8} {'err %':>6} {'act+cache':>9} "
          f"{'RSS MB':>7} {'s/step':>7} {'tok/s':>6} {'GFLOP/s':>8} {'matmul':>7} {'ratio':>6}")


def row(r: dict) -> str:
    if "error" in r:
        return f"{r['name']:38} failed: {r['error']}"
    mb = 1e6
    return (f"{r['name']:38} {r['peak'] / mb:8.0f} {r['predicted'] / mb:8.0f} "
            f"{r['error_pct']:+6.1f} {(r['active'] + r['cache']) / mb:9.0f} {r['rss'] / mb:7.0f} "
            f"{r['seconds'][-1]:7.1f} {r['tokens_per_s']:6.1f} {r['step_flops'] / 1e9:8.1f} "
            f"{r['matmul_flops'] / 1e9:7.1f} {r['flops_ratio']:6.2f}")


def kernels(rows: int = 32, hidden: int = 4096, width: int = 14336) -> None:
    """Why a quantized CPU step is slow: the block's up-projection four ways."""
    import mlx.core as mx
    x = mx.random.normal((rows, hidden))
    w = 0.02 * mx.random.normal((width, hidden))
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    xb, wb = x.astype(mx.bfloat16), w.astype(mx.bfloat16)
    g = mx.random.normal((rows, width))
    mx.eval(x, w, wq, scales, biases, xb, wb, g)
    flop = 2 * rows * hidden * width
    cases = {
        "float32 matmul (BLAS sgemm)": lambda: x @ w.T,
        "bfloat16 matmul": lambda: xb @ wb.T,
        "4-bit quantized_matmul (forward)": lambda: mx.quantized_matmul(
            x, wq, scales, biases, transpose=True, group_size=64, bits=4),
        "4-bit quantized_matmul (input gradient)": lambda: mx.quantized_matmul(
            g, wq, scales, biases, transpose=False, group_size=64, bits=4),
        "dequantize + float32 matmul": lambda: x @ mx.dequantize(
            wq, scales, biases, group_size=64, bits=4).T,
    }
    print(f"[{rows}, {hidden}] x [{hidden}, {width}], MLX {mx.__version__}, "
          f"device {mx.default_device()}")
    for name, fn in cases.items():
        mx.eval(fn())
        tic = time.perf_counter()
        mx.eval(fn())
        dt = time.perf_counter() - tic
        print(f"  {name:42} {dt * 1e3:9.1f} ms {flop / dt / 1e9:7.2f} GFLOP/s", flush=True)


def loss_speed(positions: int = 512, vocab: int = 32032, hidden: int = 4096,
               rounds: int = 3) -> None:
    """The loss alone, chunked against unchunked, rounds alternating: value and gradient
    (compiled, as the step compiles it) of the loss from [positions, hidden] float32 hidden
    states through a frozen [vocab, hidden] head."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_tune.backends.mlx import chunked_loss as cl
    head_module = nn.Linear(hidden, vocab, bias=False)
    head_module.freeze()
    head = cl.OutputHead(head_module, False, vocab)
    h = mx.random.normal((1, positions, hidden))
    y = mx.random.randint(0, vocab, (1, positions))
    mx.eval(h, y, head_module.parameters())
    fns = {"unchunked": lambda h: nn.losses.cross_entropy(head(h), y).sum(),
           "chunked": lambda h: -cl.token_logps(h, head, y)[0].sum()}
    grads = {k: mx.compile(mx.value_and_grad(f), inputs=head_module.state)
             for k, f in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, int] = {}
    for k, g in grads.items():
        mx.eval(g(h))
    for _ in range(rounds):
        for k, g in grads.items():
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            tic = time.perf_counter()
            mx.eval(g(h))
            times[k].append(time.perf_counter() - tic)
            peaks[k] = mx.get_peak_memory() - base
    print(f"loss of {positions} positions, vocab {vocab}, hidden {hidden} (float32, frozen "
          f"head, compiled), {rounds} rounds alternating:")
    for k in fns:
        print(f"  {k:10} best {min(times[k]):7.2f} s  median {sorted(times[k])[rounds // 2]:7.2f}"
              f" s  peak {peaks[k] / 1e6:7.0f} MB")
    print(f"  chunked / unchunked time (best): {min(times['chunked']) / min(times['unchunked']):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[],
                        help="run the configurations whose name contains this (repeatable)")
    parser.add_argument("--skip", action="append", default=[],
                        help="leave out the configurations whose name contains this")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) /
                        "mlx-tune-bench-models", help="where the generated models are kept")
    parser.add_argument("--output", type=Path, help="append each result as a JSON line")
    parser.add_argument("--kernels", action="store_true", help="the quantized-matmul profile")
    parser.add_argument("--list", action="store_true", help="print the matrix and exit")
    parser.add_argument("--loss-speed", action="store_true",
                        help="the loss alone, chunked vs unchunked, rounds alternating")
    parser.add_argument("--kernels-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(Config(**json.loads(args.child)), args.model_dir)))
        return 0
    env = dict(bench_env(), PYTHONPATH=str(REPO))
    if args.kernels_child:
        kernels()
        return 0
    if args.kernels:  # in a child: the BLAS the product preloads
        return subprocess.run([sys.executable, __file__, "--kernels-child"], env=env).returncode
    if args.loss_speed and not os.environ.get("MLX_TUNE_BLAS"):
        return subprocess.run([sys.executable, __file__, "--loss-speed"], env=env).returncode
    if args.loss_speed:
        loss_speed()
        return 0
    configs = [c for c in MATRIX if (not args.only or any(o in c.name for o in args.only))
               and not any(s in c.name for s in args.skip)]
    if args.list:
        print("\n".join(c.name for c in configs))
        return 0
    print(f"machine: {os.cpu_count()} CPUs, {os.uname().machine}, "
          f"{os.uname().sysname} {os.uname().release}")
    print(HEADER, flush=True)
    for c in configs:
        r = run_config(c, args.models, env)
        print(row(r), flush=True)
        if args.output:
            with args.output.open("a") as f:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
