"""``mlx-tune generate`` on MLX: mlx-lm's own loader and generator, so what works here
works with ``mlx_lm.generate``."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_tune.backends.mlx.base_model import load_base


def generate_with_adapter(model_dir: Path | str, adapter_dir: Path | str | None,
                          messages: list[dict], max_tokens: int,
                          tools: list[dict] | None = None) -> str:
    """Greedy reply of the base (rebuilt as it was trained: an adapter trained on a base
    quantized on load gets the same quantization) with a saved adapter; ``tools`` go to
    the chat template (Hermes-style templates list them in a system turn)."""
    from mlx_lm.generate import generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_tokenizer

    config = {}
    if adapter_dir is not None:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    model, base_config, _ = load_base(Path(model_dir), quantize=config.get("quantize"),
                                      group_size=config.get("quantize_group_size") or 64)
    if adapter_dir is not None:
        load_adapters(model, str(adapter_dir))
    model.eval()
    tokenizer = load_tokenizer(Path(model_dir), eos_token_ids=base_config.get("eos_token_id"))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                           tools=tools or None)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens,
                    sampler=make_sampler(temp=0.0))
