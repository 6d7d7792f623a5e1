"""`mlx-tune generate`: a quick look at what an adapter learned."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlx_tune.models.hub import resolve_model
from mlx_tune.backends import registry
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
    if tools:  # the probe training uses: a template that drops tools is refused, not ignored
        from mlx_tune.data.chat_template import check_tool_template
        from mlx_tune.models.tokenizer import load_tokenizer
        check_tool_template(load_tokenizer(resolved.path), f"--tools {args.tools}",
                            "tools were given")
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    generate = registry.get(backend).load("generate")
    print(generate(resolved.path, args.adapter, messages, args.max_tokens, tools=tools))
    return EXIT_OK
