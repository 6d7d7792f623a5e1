"""Fusing on torch with peft's ``merge_and_unload``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from mlx_tune.backends.torch.loading import load_base
from mlx_tune.config.schema import Spec
from mlx_tune.models.tokenizer import copy_chat_template, load_tokenizer


def fuse(model_dir: Path, adapter: Path, output: Path, spec: Spec, *, dequantize: bool,
         log: Callable[[str], None]) -> None:
    """peft's merge_and_unload into the float base (``dequantize`` is implied: merging
    into 4/8-bit layers would round the merged weight again)."""
    from peft import PeftModel

    if (adapter / "config.json").is_file():  # a full fine-tune saved the whole model
        shutil.copytree(adapter, output, dirs_exist_ok=True)
        return
    if spec.quantize:
        # Merging into 4/8-bit layers would round the merged weight again; the float
        # base is the better reference, and what transformers and mlx-lm load anyway.
        log(f"the base was trained {spec.quantize}-bit; the fused model holds float weights")
    model = load_base(model_dir, quantize=None, dtype=spec.dtype, device=torch.device("cpu"),
                      trust_remote_code=spec.trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    stored = json.loads((model_dir / "config.json").read_text())
    name = stored.get("dtype") or stored.get("torch_dtype")
    if spec.dtype == "auto" and isinstance(name, str) and hasattr(torch, name):
        model = model.to(getattr(torch, name))  # the base's own dtype, not the CPU's float32
    model.save_pretrained(str(output), safe_serialization=True)
    load_tokenizer(model_dir, spec.trust_remote_code).save_pretrained(str(output))
    copy_chat_template(model_dir, output)
