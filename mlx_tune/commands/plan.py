"""`mlx-tune plan`: the memory planner's table for a spec, and the flags it proposes.

The estimate itself is training/planner.py; this module finds the model's ``config.json``
without downloading weights and prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from mlx_tune.config.schema import Spec
from mlx_tune.config.spec import require
from mlx_tune.exit_codes import EXIT_ERROR, EXIT_OK
from mlx_tune.training.planner import GB, Estimate, ModelShape, budget_bytes, estimate, propose


# -- finding config.json without downloading weights -----------------------------------

def load_config(name: str, spec: Spec, log: Callable[[str], Any] = print,
                backend: str = "mlx") -> dict:
    """config.json of --model: a local directory or embedded alias via hub.resolve_model;
    a Hugging Face id or alias from the cache, else only config.json is fetched (a plan
    must not download gigabytes of weights)."""
    from mlx_tune.models.hub import ModelError, _looks_like_path, hf_offline, load_aliases, resolve_model

    entry = {k.lower(): v for k, v in load_aliases().items()}.get(name.lower(), {})
    repo = entry.get("repo", name)
    if Path(name).expanduser().exists() or _looks_like_path(name) or "/" not in repo:
        # A directory, an embedded alias, or a spelling error: resolve_model handles all
        # three without a download (and explains the error in one line).
        path = resolve_model(name, quantize=spec.quantize, backend=backend, log=log).path
        return json.loads((path / "config.json").read_text())
    import huggingface_hub
    cached = huggingface_hub.try_to_load_from_cache(repo, "config.json")
    if not isinstance(cached, str):
        if hf_offline():
            raise ModelError(f"plan: config.json of '{repo}' is not in the Hugging Face cache "
                             "and HF_HUB_OFFLINE is set: pass --model DIR with its config.json")
        try:
            cached = huggingface_hub.hf_hub_download(repo, "config.json")
        except Exception as e:  # noqa: BLE001 - any hub failure is one line for the user
            raise ModelError(f"plan: cannot fetch config.json of '{repo}' ({type(e).__name__})"
                             "; pass --model DIR with its config.json") from None
    return json.loads(Path(cached).read_text())


# -- the command -------------------------------------------------------------------------

def _size(x: float) -> str:
    return f"{x / GB:.2f} GB" if abs(x) >= GB else f"{x / 1e6:.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


ROWS = [("params", lambda e, b: _count(e.params)),
        ("trainable", lambda e, b: _count(e.trainable)),
        ("weights", lambda e, b: _size(e.weights)),
        ("grads+optimizer", lambda e, b: _size(e.grads_optimizer)),
        ("activations", lambda e, b: _size(e.activations)),
        ("logits", lambda e, b: _size(e.logits)),
        ("total (peak)", lambda e, b: _size(e.total)),
        ("headroom", lambda e, b: _size(b - e.total))]


def format_table(columns: list[tuple[str, Estimate]], budget: float) -> str:
    width = max(len(title) for title, _ in columns) + 2
    lines = [" " * 16 + "".join(f"{title:>{width}}" for title, _ in columns)]
    lines += [f"{name:16}" + "".join(f"{fn(e, budget):>{width}}" for _, e in columns)
              for name, fn in ROWS]
    return "\n".join(lines)


def plan_cli(spec: Spec, args: Any) -> int:
    """`mlx-tune plan`: the table for the spec's batch and for the proposal, and the flags."""
    require(spec, "model")
    from mlx_tune.backends.select import select_backend
    backend = select_backend(spec.backend)
    shape = ModelShape.from_config(load_config(spec.model, spec, backend=backend))
    budget, why = budget_bytes(spec, getattr(args, "memory_gb", None), backend)
    ga = 1 if spec.gradient_accumulation_steps == "auto" else spec.gradient_accumulation_steps
    current = estimate(shape, spec, spec.batch_size // ga, spec.max_length, ga, backend)
    best, fits = propose(shape, spec, budget, backend)
    bits = spec.quantize or shape.quant_bits
    print(f"plan for {spec.model} ({backend}, {spec.fine_tune_type}"
          f"{f', {bits}-bit' if bits else ''}, max_length {spec.max_length}, batch_size "
          f"{spec.batch_size}{', gradient checkpointing' if spec.gradient_checkpointing else ''})")
    print(f"budget: {_size(budget)} ({why})")
    print(format_table([(f"micro {current.micro_batch} x {ga}", current),
                        (f"micro {best.micro_batch} x {best.accumulation}", best)], budget))
    if fits:
        print(f"use: --batch-size {spec.batch_size} --gradient-accumulation-steps "
              f"{best.accumulation}  (micro-batch {best.micro_batch})")
        return EXIT_OK
    hint = "" if spec.gradient_checkpointing else "add --gradient-checkpointing, "
    print(f"does not fit even with micro-batch 1: {hint}lower --max-length, add --quantize 4 "
          "or use a smaller model")
    return EXIT_ERROR
