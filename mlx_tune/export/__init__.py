"""What happens after training: adapters converted between mlx-lm and peft, adapters
fused into their base (Hugging Face format, optionally GGUF)."""

from __future__ import annotations

from mlx_tune.errors import UserError


class ExportError(UserError, ValueError):
    """Bad input to convert-adapter / fuse: reported as one line by the CLI."""
