"""GGUF through mlx-lm's converter, from a fused model's Hugging Face weights."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from mlx_tune.export import ExportError


def write_gguf(output: Path) -> Path:
    """mlx-lm's GGUF converter on the fused Hugging Face weights (float only)."""
    from mlx_lm.gguf import convert_to_gguf

    config = json.loads((output / "config.json").read_text())
    if config.get("quantization") or config.get("quantization_config"):
        raise ExportError("GGUF export needs float weights: add --dequantize")
    weights: dict[str, mx.array] = {}
    for f in sorted(output.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    path = output / "model.gguf"
    convert_to_gguf(str(output), weights, config, str(path))
    return path
