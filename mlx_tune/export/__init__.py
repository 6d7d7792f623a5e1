"""What happens after training: adapters converted between mlx-lm and peft, adapters
fused into their base (Hugging Face format, optionally GGUF)."""

from __future__ import annotations

import shutil
from pathlib import Path


class ExportError(ValueError):
    """Bad input to convert-adapter / fuse: reported as one line by the CLI."""


def copy_chat_template(model_dir: Path, output: Path) -> None:
    """Tokenizer saving keeps the template; a standalone .jinja file is copied as well."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (model_dir / name).is_file() and not (output / name).exists():
            shutil.copy(model_dir / name, output / name)
