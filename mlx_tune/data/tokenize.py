"""Records -> token ids and target masks, with the model's own chat template.

Prompt masks come from rendering message prefixes and comparing *token* prefixes with the
full conversation, never from searching for strings: the template owns the format (headers,
BOS, system prompts), and a boundary token that BPE merges across turns simply lands on
the side where the full rendering puts it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np

from mlx_tune.data.records import DataError, Record

# Fast tokenizers are not safe to drive from two threads at once (the Rust side is
# mutably borrowed when settings change), and the prefetch thread tokenizes while the
# main thread may tokenize validation data: serialise every call.
_LOCK = threading.RLock()


@dataclass(frozen=True)
class Example:
    """A tokenized record; ``mask[t] = 1`` where token t is a training target.

    Arrays, not lists: a cached dataset of Python ints costs ~7x the memory.
    """

    record: Record
    ids: np.ndarray  # int32 [length]
    mask: np.ndarray  # uint8 [length]

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def targets(self) -> int:
        return int(self.mask[1:].sum())


def unwrap(tokenizer):
    """The Hugging Face tokenizer inside mlx-lm's TokenizerWrapper (which is not callable)."""
    if type(tokenizer).__name__ == "TokenizerWrapper" and hasattr(tokenizer, "_tokenizer"):
        return tokenizer._tokenizer
    return tokenizer


def _encode(tokenizer, text: str) -> list[int]:
    # Templates write their own BOS etc., as in apply_chat_template(tokenize=True).
    return list(tokenizer.encode(text, add_special_tokens=False))


def _render(tokenizer, messages: list, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _encode_many(tokenizer, texts: list[str]) -> dict[str, list[int]]:
    """Token ids of distinct texts, in one tokenizer call (far less per-call overhead)."""
    unique = list(dict.fromkeys(texts))
    encoded = tokenizer(unique, add_special_tokens=False)["input_ids"]
    return {t: list(ids) for t, ids in zip(unique, encoded)}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _all_targets(n: int) -> list[int]:
    return [0] * min(n, 1) + [1] * max(n - 1, 0)  # position 0 is never a target


def _is_blank(tokenizer, token: int, cache: dict) -> bool:
    if token not in cache:
        cache[token] = tokenizer.decode([token]).strip() == ""
    return cache[token]


def encode_chat(tokenizer, messages: list, mask_prompt: bool) -> tuple[list[int], list[int]]:
    """Ids of the rendered conversation; with mask_prompt, targets = assistant turns.

    An assistant turn spans from the end of the rendering of the messages before it plus
    the generation prompt (its header), to the end of the rendering that includes it,
    less trailing whitespace tokens: the answer and its end-of-turn token are targets,
    the separator the template writes after the end-of-turn token is not.
    """
    full = _render(tokenizer, messages, False)
    if not mask_prompt:
        ids = _encode(tokenizer, full)
        return ids, _all_targets(len(ids))
    # For each assistant turn k: the rendering before it (with its header), and up to it.
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    before = {k: _render(tokenizer, messages[:k], True) for k in turns if k}
    upto = {k: _render(tokenizer, messages[:k + 1], False) for k in turns}
    encoded = _encode_many(tokenizer, [full, *before.values(), *upto.values()])
    ids = encoded[full]
    mask = [0] * len(ids)
    blank: dict = {}
    for k in turns:
        start = _common_prefix(encoded[before[k]], ids) if k else 0
        end = _common_prefix(encoded[upto[k]], ids)
        while end > start and _is_blank(tokenizer, ids[end - 1], blank):
            end -= 1
        for t in range(max(start, 1), end):  # position 0 is never a target
            mask[t] = 1
    return ids, mask


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """``tokenizer(text)`` ids plus EOS; every token but the first is a target."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, _all_targets(len(ids))


def encode_record(record: Record, tokenizer, mask_prompt: bool) -> tuple[list[int], list[int]]:
    """(input_ids, mask) of one record, untruncated."""
    with _LOCK:
        if record.kind == "text":
            return encode_text(tokenizer, record.text)
        if record.kind == "completions" and not getattr(tokenizer, "chat_template", None):
            # A base model without a template: prompt then completion + EOS, as plain text.
            prompt = list(tokenizer(record.messages[0]["content"])["input_ids"])
            answer = _encode(tokenizer, record.messages[1]["content"])
            if tokenizer.eos_token_id is not None:
                answer.append(tokenizer.eos_token_id)
            mask = [0 if mask_prompt else 1] * len(prompt) + [1] * len(answer)
            mask[0] = 0
            return prompt + answer, mask
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{record.where}: the tokenizer has no chat template, which chat "
                            "data needs (use the text format for a base model)")
        try:
            return encode_chat(tokenizer, list(record.messages), mask_prompt)
        except Exception as e:  # jinja raises e.g. "roles must alternate user/assistant"
            raise DataError(f"{record.where}: the chat template cannot render this record "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                            ) from None


@dataclass
class Truncation:
    """Counts for the one summary warning per dataset."""

    name: str
    max_length: int
    seen: int = 0
    truncated: int = 0
    longest: int = 0
    dropped: int = 0  # no target left after truncation
    empty: int = 0  # no target at all (e.g. an empty text)

    def message(self) -> Optional[str]:
        parts = []
        if self.truncated:
            text = (f"truncated {self.truncated} of {self.seen} {self.name} sequences to "
                    f"max_length={self.max_length} tokens (longest {self.longest})")
            if self.dropped:
                text += f"; dropped {self.dropped} left with no target tokens"
            parts.append(text)
        if self.empty:
            parts.append(f"dropped {self.empty} of {self.seen} {self.name} records with no "
                         "target tokens")
        return "; ".join(parts) or None


def make_example(record: Record, tokenizer, mask_prompt: bool, max_length: int,
                 counts: Optional[Truncation] = None) -> Optional[Example]:
    """Tokenize and truncate one record (keep the first max_length tokens).

    Returns None when no target token is left, counting why in ``counts``.
    """
    ids, mask = encode_record(record, tokenizer, mask_prompt)
    if counts is not None:
        counts.seen += 1
    had_targets = sum(mask[1:]) > 0
    if len(ids) > max_length:
        if counts is not None:
            counts.truncated += 1
            counts.longest = max(counts.longest, len(ids))
        ids, mask = ids[:max_length], mask[:max_length]
    if sum(mask[1:]) == 0:
        if counts is not None:
            if had_targets:
                counts.dropped += 1
            else:
                counts.empty += 1
        return None
    return Example(record, np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8))


def tokenize_all(records: Iterable[Record], tokenizer, mask_prompt: bool, max_length: int,
                 name: str, log: Callable[[str], None]) -> list[Example]:
    """Tokenize a dataset; one summary line for truncated and dropped records."""
    counts = Truncation(name, max_length)
    out = [ex for r in records
           if (ex := make_example(r, tokenizer, mask_prompt, max_length, counts)) is not None]
    message = counts.message()
    if message:
        log(message)
    return out
