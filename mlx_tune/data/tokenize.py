"""Records -> token ids and target masks, with the model's own chat template.

Prompt masks come from rendering message prefixes and comparing *token* prefixes with the
full conversation, never from searching for strings: the template owns the format (headers,
BOS, system prompts), and a boundary token that BPE merges across turns simply lands on
the side where the full rendering puts it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from mlx_tune.data.messages import uses_tools
from mlx_tune.data.chat_template import check_tool_template, render
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


def encode_chat(tokenizer, messages: list, mask_prompt: bool,
                tools: Optional[list] = None) -> tuple[list[int], list[int]]:
    """Ids of the rendered conversation; with mask_prompt, targets = assistant turns.

    ``tools`` go to the template with every rendering, so the tool definitions (usually in
    the system turn) are part of each prefix and never targets. An assistant turn, tool
    calls included, spans from the end of the rendering of the messages before it plus
    the generation prompt (its header), to the end of the rendering that includes it,
    less trailing whitespace tokens: the answer and its end-of-turn token are targets,
    the separator the template writes after the end-of-turn token is not.
    """
    full = render(tokenizer, messages, False, tools)
    if not mask_prompt:
        ids = _encode(tokenizer, full)
        return ids, _all_targets(len(ids))
    # For each assistant turn k: the rendering before it (with its header), and up to it.
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    before = {k: render(tokenizer, messages[:k], True, tools) for k in turns if k}
    upto = {k: render(tokenizer, messages[:k + 1], False, tools) for k in turns}
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
        if uses_tools(record.messages, record.tools):
            check_tool_template(tokenizer, record.where)
        try:
            return encode_chat(tokenizer, list(record.messages), mask_prompt,
                               list(record.tools) if record.tools else None)
        except Exception as e:  # jinja raises e.g. "roles must alternate user/assistant"
            raise DataError(f"{record.where}: the chat template cannot render this record "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                            ) from None


@dataclass
class Truncation:
    """Counts for the one summary warning per dataset."""

    name: str
    max_length: int
    limit: str = "max_length"  # the setting max_length comes from (pack_length when packed)
    seen: int = 0
    truncated: int = 0
    longest: int = 0
    dropped: int = 0  # no target left after truncation
    empty: int = 0  # no target at all (e.g. an empty text)

    def message(self) -> Optional[str]:
        parts = []
        if self.truncated:
            text = (f"truncated {self.truncated} of {self.seen} {self.name} sequences to "
                    f"{self.limit}={self.max_length} tokens (longest {self.longest})")
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

    Returns None when no target token is left, counting why in ``counts``. A preference
    record becomes a ``PairExample`` (``make_pair``), counted in a ``PairCounts``.
    """
    if record.kind == "preference":
        return make_pair(record, tokenizer, max_length,
                         counts if isinstance(counts, PairCounts) else None)
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
                 name: str, log: Callable[[str], None], limit: str = "max_length"
                 ) -> list[Example]:
    """Tokenize a dataset; one summary line for truncated and dropped records. (Unpaired
    records go through unpaired.tokenize_split: each borrows another's completion.)"""
    counts, pairs = Truncation(name, max_length, limit), PairCounts(name, max_length)
    out = [ex for r in records
           if (ex := make_example(r, tokenizer, mask_prompt, max_length,
                                  pairs if r.kind == "preference" else counts)) is not None]
    for message in (counts.message(), pairs.message()):
        if message:
            log(message)
    return out


# -- preference pairs (dpo, orpo, simpo) ---------------------------------------------
# Each side is tokenized as prompt + completion with the model's chat template (the
# prompt rendered with the generation prompt, so the assistant header is prompt, never
# target); only the completion's tokens are targets. A row longer than max_length keeps
# its start (TRL's truncation_mode="keep_start"); a pair whose prompt leaves no
# completion token on a side is dropped and counted. batching.pad_pairs lays them out.

@dataclass(frozen=True)
class PairExample:
    """A tokenized pair: each side's ids and target mask (the completion only)."""

    record: Any
    chosen: tuple[np.ndarray, np.ndarray]  # (ids int32, mask uint8)
    rejected: tuple[np.ndarray, np.ndarray]

    @property
    def length(self) -> int:
        return max(len(self.chosen[0]), len(self.rejected[0]))

    @property
    def targets(self) -> int:
        return int(self.chosen[1][1:].sum() + self.rejected[1][1:].sum())


@dataclass
class PairCounts:
    """What the one summary line per dataset reports."""

    name: str
    max_length: int
    seen: int = 0
    truncated: int = 0  # pairs with a side cut to max_length (keep_start)
    no_room: int = 0  # pairs dropped: the prompt fills max_length
    first_no_room: str = ""
    identical: int = 0  # chosen == rejected: no preference to learn
    first_identical: str = ""
    cut_identical: int = 0  # pairs dropped: the sides differ only beyond max_length
    first_cut_identical: str = ""

    def message(self) -> Optional[str]:
        parts = cut_parts(self, "pairs")
        if self.cut_identical:
            parts.append(f"dropped {self.cut_identical} {self.name} pairs whose chosen and "
                         f"rejected differ only after max_length={self.max_length} tokens "
                         f"(the first at {self.first_cut_identical}): cut, they are the same")
        if self.identical:
            parts.append(f"warning: {self.identical} {self.name} pairs have identical chosen "
                         f"and rejected completions, which teach nothing (the first at "
                         f"{self.first_identical})")
        return "; ".join(parts) or None


def cut_parts(counts, unit: str) -> list[str]:
    """A split's summary of preference rows (``PairCounts``, ``unpaired.UnpairedCounts``):
    records with a row cut to max_length, records dropped for want of room."""
    parts = []
    if counts.truncated:
        parts.append(f"truncated {counts.truncated} of {counts.seen} {counts.name} {unit} to "
                     f"max_length={counts.max_length} tokens, keeping their start")
    if counts.no_room:
        parts.append(f"dropped {counts.no_room} {counts.name} {unit} whose prompt leaves no "
                     f"room for the completion within max_length={counts.max_length} "
                     f"(the first at {counts.first_no_room})")
    return parts


def encode_side(tokenizer, prompt: Sequence[dict], completion: Sequence[dict],
                tools: Optional[list], where: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of prompt + completion; the mask covers the completion's tokens."""
    with _LOCK:
        if not getattr(tokenizer, "chat_template", None):
            if len(prompt) != 1 or prompt[0]["role"] != "user" or len(completion) != 1:
                raise DataError(f"{where}: conversational preference records need a chat "
                                "template, which this tokenizer lacks (use string fields)")
            ids = list(tokenizer(prompt[0]["content"])["input_ids"])
            start = len(ids)
            ids += list(tokenizer.encode(completion[0]["content"], add_special_tokens=False))
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            end = len(ids)
        else:
            try:
                head = render(tokenizer, list(prompt), True, tools)
                full = render(tokenizer, [*prompt, *completion], False, tools)
            except Exception as e:  # jinja raises e.g. "roles must alternate user/assistant"
                raise DataError(f"{where}: the chat template cannot render this record "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                                ) from None
            encoded = _encode_many(tokenizer, [head, full])
            ids = encoded[full]
            start, end, blank = _common_prefix(encoded[head], ids), len(ids), {}
            # The separator a template writes after the end-of-turn token is not a target.
            while end > start and _is_blank(tokenizer, ids[end - 1], blank):
                end -= 1
    mask = [0] * len(ids)
    for t in range(max(start, 1), end):
        mask[t] = 1
    return ids, mask


def make_pair(record: Any, tokenizer, max_length: int,
              counts: Optional[PairCounts] = None) -> Optional[PairExample]:
    """Tokenize one pair, each side cut to max_length keeping its start; None when the
    prompt leaves no completion token on a side."""
    tools = list(record.tools) if record.tools else None
    sides, cut = [], False
    for completion in (record.chosen, record.rejected):
        ids, mask = encode_side(tokenizer, record.messages, completion, tools, record.where)
        cut |= len(ids) > max_length
        ids, mask = ids[:max_length], mask[:max_length]
        sides.append((np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)))
    empty = any(not m[1:].any() for _, m in sides)
    identical = record.chosen == record.rejected
    # Cut to the same tokens, a pair teaches nothing and would still count as a pair
    # (and as a wrong one in the reward accuracy); a record-level duplicate is kept
    # with a warning, as the user wrote it.
    cut_same = cut and not identical and all(np.array_equal(a, b) for a, b in zip(*sides))
    if counts is not None:
        counts.seen += 1
        counts.truncated += cut and not empty
        if empty:
            counts.no_room += 1
            counts.first_no_room = counts.first_no_room or record.where
        elif cut_same:
            counts.cut_identical += 1
            counts.first_cut_identical = counts.first_cut_identical or record.where
        if identical:
            counts.identical += 1
            counts.first_identical = counts.first_identical or record.where
    return None if empty or cut_same else PairExample(record, sides[0], sides[1])
