"""Fusing on MLX with mlx-lm's own machinery (what ``mlx_lm fuse`` does), and GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_unflatten

from mlx_tune.export import ExportError


def fuse_mlx(model_dir: Path, adapter: Path, output: Path, spec, *, dequantize: bool) -> None:
    """The base rebuilt as training saw it (quantized and cast like the backend does),
    the adapter loaded by mlx-lm, each LoRA/DoRA layer's ``fuse()``, then mlx-lm's save."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, load_tokenizer, save
    from mlx_tune.backends.mlx.base_model import load_base
    from mlx_tune.export import copy_chat_template

    model, config, _ = load_base(model_dir, quantize=spec.quantize,
                                 group_size=spec.quantize_group_size, dtype=spec.dtype,
                                 trust_remote_code=spec.trust_remote_code)
    model = load_adapters(model, str(adapter))
    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    tokenizer = load_tokenizer(model_dir)
    save(output, model_dir, model, tokenizer, config, donate_model=False)
    copy_chat_template(model_dir, output)


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
