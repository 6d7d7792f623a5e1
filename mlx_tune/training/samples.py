"""Sample generation at evaluation time and the pluggable metrics that score it."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from mlx_tune.config.schema import Spec, SpecError


def load_metric(path: str) -> Callable[[str], float]:
    """'package.module:function' -> the function (it takes the generated text)."""
    module_name, _, func_name = path.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"eval_metrics: cannot load '{path}' ({e})") from None
    if not callable(func):
        raise SpecError(f"eval_metrics: '{path}' is not a function")
    return func


def sample_conversations(spec: Spec, data: Any) -> list[tuple[list[dict], list[dict] | None]]:
    """The spec's prompts, or the first validation conversations without their answer,
    each with its record's tools (None when it has none)."""
    if spec.num_samples <= 0:
        return []
    if spec.sample_prompts:
        return [([{"role": "user", "content": p}], None)
                for p in spec.sample_prompts[: spec.num_samples]]
    if data.valid is None:
        return []
    return data.valid.first_samples(spec.num_samples)


def run_samples(backend: Any, spec: Spec, data: Any) -> list[dict]:
    """Generate for each sample prompt (tools rendered as in training) and score the text
    with every metric."""
    metrics = {path: load_metric(path) for path in spec.eval_metrics}
    out = []
    for messages, tools in sample_conversations(spec, data):
        text = backend.generate(messages, spec.sample_max_tokens, tools=tools)
        scores = {path.rsplit(":", 1)[-1]: float(fn(text)) for path, fn in metrics.items()}
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        out.append({"prompt": prompt, "text": text, "metrics": scores})
    return out
