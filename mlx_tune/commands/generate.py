"""`mlx-tune generate`: a quick look at what an adapter learned."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlx_tune.models.hub import resolve_model
from mlx_tune.backends.select import select_backend
from mlx_tune.exit_codes import EXIT_OK


def generate_cli(args: argparse.Namespace) -> int:
    backend = select_backend(args.backend)
    quantize = None
    if args.adapter:
        config_path = Path(args.adapter) / "adapter_config.json"
        if not config_path.is_file():
            from mlx_tune.models.hub import ModelError
            raise ModelError(f"{args.adapter}: no adapter_config.json (expected an adapter "
                             "directory such as OUTPUT_DIR/adapters)")
        try:
            adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            from mlx_tune.models.hub import ModelError
            raise ModelError(f"{config_path}: not a readable JSON adapter config "
                             f"({str(e).splitlines()[0]})") from None
        if not isinstance(adapter_config, dict):
            from mlx_tune.models.hub import ModelError
            raise ModelError(f"{config_path}: expected a JSON object, got "
                             f"{type(adapter_config).__name__}")
        quantize = adapter_config.get("quantize")
    resolved = resolve_model(args.model, quantize=quantize, backend=backend)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    if backend == "torch":
        from mlx_tune.backends.torch.generation import generate_with_adapter
        text = generate_with_adapter(resolved.path, args.adapter, messages, args.max_tokens)
    else:
        text = generate_mlx(resolved.path, args.adapter, messages, args.max_tokens, quantize)
    print(text)
    return EXIT_OK


def generate_mlx(model_dir: Path, adapter: str | None, messages: list[dict], max_tokens: int,
                 quantize: int | None = None) -> str:
    """mlx-lm's own loader and generator: what works here works with `mlx_lm.generate`."""
    from mlx_lm.generate import generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model, load_tokenizer, quantize_model

    model, config = load_model(Path(model_dir))
    if quantize and "quantization" not in config:
        # The adapter was trained on a base quantized on load: rebuild the same base.
        group = json.loads((Path(adapter) / "adapter_config.json").read_text()).get(
            "quantize_group_size", 64)
        model, config = quantize_model(model, config, group, quantize)
    if adapter:
        load_adapters(model, adapter)
    model.eval()
    tokenizer = load_tokenizer(Path(model_dir), eos_token_ids=config.get("eos_token_id"))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0))
