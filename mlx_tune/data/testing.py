"""Helpers for tests: a tiny ChatML BPE tokenizer trained in memory, and JSONL writers.

Lets the data layer (and anyone downstream) be tested without downloading a model.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable

CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Create a recipe for pancakes with flour, eggs, milk and butter.",
    "Mix the dry ingredients, whisk in the wet ones, then cook on a hot pan.",
    "How do I make a tomato soup? Roast tomatoes with garlic and blend them.",
    "You are a helpful cooking assistant. Answer briefly.",
    "system user assistant recipe: {text} Please help me with this",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with ChatML specials, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                      eos_token="<|im_end|>", pad_token="<pad>",
                                      unk_token="<unk>")
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def write_jsonl(path: str | Path, rows: Iterable) -> Path:
    """Write rows (dicts, or raw strings written verbatim) one per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def chat(user: str, answer: str, **meta) -> dict:
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": answer}], **meta}
