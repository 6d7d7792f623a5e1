"""Greedy generation with a torch model: samples during training, ``mlx-tune generate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mlx_tune.backends.torch.loading import SIDECAR, default_device, load_base
from mlx_tune.models.tokenizer import load_tokenizer


@torch.no_grad()
def greedy(model: torch.nn.Module, tokenizer: Any, messages: list[dict], max_tokens: int,
           device: torch.device, tools: list[dict] | None = None) -> str:
    """Greedy decoding of the assistant's reply (what ``generate`` shows at evaluations);
    ``tools`` (function specs) are rendered by the chat template."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False, tools=tools or None)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    inputs = torch.tensor([list(ids)], device=device)
    eos = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                         max_new_tokens=max_tokens, do_sample=False, use_cache=True,
                         eos_token_id=sorted(e for e in eos if e is not None),
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True)


def generate_with_adapter(model_dir: Path | str, adapter_dir: Path | str | None,
                          messages: list[dict], max_tokens: int,
                          tools: list[dict] | None = None) -> str:
    """``mlx-tune generate --backend torch``: the base (rebuilt as it was trained,
    quantization included) with a saved adapter, or a fully fine-tuned model directory."""
    model_dir = Path(model_dir)
    device = default_device()
    info: dict = {}
    if adapter_dir is not None and (Path(adapter_dir) / SIDECAR).is_file():
        info = json.loads((Path(adapter_dir) / SIDECAR).read_text())
    if adapter_dir is not None and (Path(adapter_dir) / "config.json").is_file():
        model_dir, adapter_dir = Path(adapter_dir), None  # a full fine-tune
    tokenizer = load_tokenizer(model_dir)
    model = load_base(model_dir, quantize=info.get("quantize"), dtype=info.get("dtype", "auto"),
                      device=device)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return greedy(model, tokenizer, messages, max_tokens, device, tools=tools)
