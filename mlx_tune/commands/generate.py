"""`mlx-tune generate`: a quick look at what an adapter learned."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlx_tune.models.hub import resolve_model
from mlx_tune.backends.select import select_backend
from mlx_tune.exit_codes import EXIT_OK


def read_tools(path: str) -> list[dict]:
    """``--tools FILE.json``: a JSON list of function specs, checked as a record's are."""
    from mlx_tune.data.messages import MessageError, parse_tools
    from mlx_tune.data.records import DataError
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataError(f"--tools {path}: not a readable JSON file "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        return list(parse_tools(value) or ())
    except MessageError as e:
        raise DataError(f"--tools {path}: {e}") from None


def generate_cli(args: argparse.Namespace) -> int:
    tools = read_tools(args.tools) if args.tools else None  # before any model loads
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
        text = generate_with_adapter(resolved.path, args.adapter, messages, args.max_tokens,
                                     tools=tools)
    else:
        text = generate_mlx(resolved.path, args.adapter, messages, args.max_tokens, quantize,
                            tools=tools)
    print(text)
    return EXIT_OK


def generate_mlx(model_dir: Path, adapter: str | None, messages: list[dict], max_tokens: int,
                 quantize: int | None = None, tools: list[dict] | None = None) -> str:
    """mlx-lm's own loader and generator: what works here works with `mlx_lm.generate`;
    ``tools`` go to the chat template (Hermes-style templates list them in a system turn)."""
    from mlx_lm.generate import generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_tokenizer
    from mlx_tune.backends.mlx.base_model import load_base

    # An adapter trained on a base quantized on load gets the same base rebuilt.
    group = json.loads((Path(adapter) / "adapter_config.json").read_text()).get(
        "quantize_group_size", 64) if quantize else 64
    model, config, _ = load_base(Path(model_dir), quantize=quantize, group_size=group)
    if adapter:
        load_adapters(model, adapter)
    model.eval()
    tokenizer = load_tokenizer(Path(model_dir), eos_token_ids=config.get("eos_token_id"))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                           tools=tools or None)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0))
