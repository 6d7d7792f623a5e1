"""Preference records (dpo, orpo, simpo): a prompt, a chosen and a rejected completion.

    {"prompt": "Recipe for soup?", "chosen": "Simmer...", "rejected": "Bake..."}
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}],      # conversational,
     "chosen": [{"role": "assistant", ...}], "rejected": [...], "tools": [...]}   # as TRL's

Each side is tokenized as prompt + completion with the model's chat template (the prompt
rendered with the generation prompt, so the assistant header is prompt, never target);
only the completion's tokens are targets. A row longer than max_length keeps its start
(TRL's ``truncation_mode="keep_start"``); a pair whose prompt leaves no completion token
on either side is dropped and counted. A batch of n pairs is 2n rows: the n chosen, then
the n rejected, padded to one width (see ``Batch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from mlx_tune.data.batch import Batch
from mlx_tune.data.batching import pad_batch
from mlx_tune.data.messages import MessageError, _message, parse_tools
from mlx_tune.data.records import DataError
from mlx_tune.data.widths import Widths

PAIRED_FIELDS = ("prompt", "chosen", "rejected")


def is_preference(obj: dict) -> bool:
    return "chosen" in obj or "rejected" in obj


def _prompt(value: Any) -> tuple:
    if isinstance(value, str):
        return ({"role": "user", "content": value},)
    if not isinstance(value, list) or not value:
        raise MessageError("'prompt' must be a string or a non-empty list of {role, content} "
                           "messages")
    return tuple(_message(m, i) for i, m in enumerate(value))


def _completion(value: Any, key: str) -> tuple:
    if isinstance(value, str):
        messages = ({"role": "assistant", "content": value},)
    elif isinstance(value, list) and value:
        messages = tuple(_message(m, i) for i, m in enumerate(value))
        if messages[0]["role"] != "assistant":
            raise MessageError(f"'{key}' must start with an assistant message, not "
                               f"{messages[0]['role']!r}")
    else:
        raise MessageError(f"'{key}' must be a string or a non-empty list of assistant "
                           "messages")
    if not any(m["content"].strip() or m.get("tool_calls") for m in messages):
        raise MessageError(f"'{key}' is empty: there is no completion to score")
    return messages


def parse_preference(obj: dict) -> dict:
    """The Record fields of a paired record; MessageError says what is wrong."""
    missing = [k for k in PAIRED_FIELDS if k not in obj or obj[k] is None]
    if missing:
        raise MessageError("preference records need 'prompt', 'chosen' and 'rejected'; "
                           f"'{missing[0]}' is missing")
    return {"messages": _prompt(obj["prompt"]), "chosen": _completion(obj["chosen"], "chosen"),
            "rejected": _completion(obj["rejected"], "rejected"),
            "tools": parse_tools(obj.get("tools"))}


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

    def message(self) -> Optional[str]:
        parts = []
        if self.truncated:
            parts.append(f"truncated {self.truncated} of {self.seen} {self.name} pairs to "
                         f"max_length={self.max_length} tokens, keeping their start")
        if self.no_room:
            parts.append(f"dropped {self.no_room} {self.name} pairs whose prompt leaves no "
                         f"room for the completion within max_length={self.max_length} "
                         f"(the first at {self.first_no_room})")
        if self.identical:
            parts.append(f"warning: {self.identical} {self.name} pairs have identical chosen "
                         f"and rejected completions, which teach nothing (the first at "
                         f"{self.first_identical})")
        return "; ".join(parts) or None


def encode_side(tokenizer, prompt: Sequence[dict], completion: Sequence[dict],
                tools: Optional[list], where: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of prompt + completion; the mask covers the completion's tokens."""
    from mlx_tune.data.tokenize import _LOCK, _common_prefix, _encode_many, _is_blank, _render
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
                head = _render(tokenizer, list(prompt), True, tools)
                full = _render(tokenizer, [*prompt, *completion], False, tools)
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
    if counts is not None:
        counts.seen += 1
        counts.truncated += cut and not empty
        if empty:
            counts.no_room += 1
            counts.first_no_room = counts.first_no_room or record.where
        if record.chosen == record.rejected:
            counts.identical += 1
            counts.first_identical = counts.first_identical or record.where
    return None if empty else PairExample(record, sides[0], sides[1])


def pad_pairs(pairs: Sequence[PairExample], pad_id: int, max_length: int,
              widths: Optional[Widths] = None) -> Batch:
    """2n rows at one width: the chosen sides, then the rejected ones in the same order."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    b = pad_batch(rows, pad_id, max_length, widths)
    return Batch(b.tokens, b.mask, paired=True)
