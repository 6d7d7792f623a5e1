"""One tokenizer for every backend: the model directory's Hugging Face tokenizer."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer (transformers' AutoTokenizer), with a pad token set.

    Both backends and the data layer share this object, so a batch means the same
    token ids on MLX and on PyTorch. Loaded once per directory: the data is checked
    with it before the model loads, and the backend then gets the same object.
    """
    from mlx_tune.models.hub import check_tokenizer_files
    check_tokenizer_files(Path(model_dir))
    return _load(str(Path(model_dir).resolve()), bool(trust_remote_code))


@functools.lru_cache(maxsize=4)
def _load(model_dir: str, trust_remote_code: bool) -> Any:
    # Tokenizers' own thread pool fights the training threads on small machines and
    # warns after fork (prefetch, distributed launchers); the data layer batches anyway.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def copy_chat_template(model_dir: Path, output: Path) -> None:
    """Tokenizer saving keeps the template; a standalone .jinja file is copied as well."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (model_dir / name).is_file() and not (output / name).exists():
            shutil.copy(model_dir / name, output / name)
