"""The base model from transformers (optionally quantized by bitsandbytes) and what the
backend needs to know of its layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from mlx_tune.backends.base import match_targets
from mlx_tune.backends.common import framework_dtypes

DTYPES = framework_dtypes(torch)
SIDECAR = "mlx_tune_adapter.json"  # how to rebuild the base an adapter was trained on


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_base(model_dir: Path, *, quantize: int | None, dtype: str, device: torch.device,
              trust_remote_code: bool = False) -> torch.nn.Module:
    """transformers' model, in the spec's dtype, optionally quantized by bitsandbytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = device.type == "cuda"
    # "auto" keeps the stored dtype on a GPU; CPU runs (development, parity) are float32.
    torch_dtype = DTYPES.get(dtype, "auto" if cuda else torch.float32)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quantize:
        compute = DTYPES.get(dtype, torch.bfloat16) if cuda else torch.float32
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=compute) if quantize == 4
            else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device}
        if torch_dtype == "auto":
            kwargs["dtype"] = compute
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    return model if quantize else model.to(device)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks (``model.layers`` in Llama/Mistral/Qwen/Gemma...)."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in (
                "layers", "h", "blocks") and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return best


def lora_keys(block: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """Module paths inside a block (``self_attn.q_proj``) for the spec's targets."""
    return match_targets([n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)],
                         targets)


def stored_numel(p: torch.Tensor) -> int:
    """Elements a parameter holds, counting a 4-bit weight's unpacked values."""
    state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: packed storage
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()
