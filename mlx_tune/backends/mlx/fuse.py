"""Fusing on MLX with mlx-lm's own machinery (what ``mlx_lm fuse`` does)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mlx.utils import tree_unflatten

from mlx_tune.backends.mlx.base_model import load_base
from mlx_tune.config.schema import Spec
from mlx_tune.models.tokenizer import copy_chat_template


def fuse(model_dir: Path, adapter: Path, output: Path, spec: Spec, *, dequantize: bool,
         log: Callable[[str], None]) -> None:
    """The base rebuilt as training saw it (quantized and cast like the backend does),
    the adapter loaded by mlx-lm, each LoRA/DoRA layer's ``fuse()``, then mlx-lm's save."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, load_tokenizer, save

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
