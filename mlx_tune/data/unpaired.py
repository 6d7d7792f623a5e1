"""Unpaired (KTO) examples: one completion per prompt, labelled desirable or not, and the
mismatched "KL row" KTO's baseline reads.

KTO's baseline z0 is estimated from rows that pair each prompt with ANOTHER example's
completion. TRL builds them when it prepares the dataset (KTOTrainer's ``_get_kl_dataset``
rotates the completions by one within blocks of rows); so do we, over the whole split in
file order: record i's KL completion is that of the next record with another prompt,
wrapping round (``kl_donors``). Fixing it before training, not per batch, means every row
of every batch is known before step 0 (a precomputed reference scores each row once) and
a resumed run sees the same rows.

Each row is tokenized as a preference pair's side is (``tokenize.encode_side``: the prompt
rendered with its generation prompt, only the completion's tokens are targets), cut to
max_length keeping its start (TRL's ``keep_start``); an example whose prompt leaves no
completion token is dropped and counted. ``batching.pad_unpaired`` lays n examples out as
2n rows: the examples, then their KL rows, with the labels beside them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from mlx_tune.data.tokenize import cut_parts, encode_side, tokenize_all

Row = tuple  # (ids int32 [length], mask uint8 [length])


@dataclass(frozen=True)
class UnpairedExample:
    """A tokenized unpaired record: its row (prompt + completion) and its KL row (the
    same prompt + the donor's completion); masks cover the completions only."""

    record: Any
    row: Row
    kl_row: Row

    @property
    def label(self) -> bool:
        return bool(self.record.label)

    @property
    def length(self) -> int:
        return max(len(self.row[0]), len(self.kl_row[0]))

    @property
    def targets(self) -> int:
        return int(self.row[1][1:].sum())


@dataclass
class UnpairedCounts:
    """What the one summary line per dataset reports."""

    name: str
    max_length: int
    seen: int = 0
    truncated: int = 0  # examples cut to max_length (keep_start)
    no_room: int = 0  # examples dropped: the prompt fills max_length
    first_no_room: str = ""
    desirable: int = 0
    undesirable: int = 0

    def message(self) -> Optional[str]:
        return "; ".join(cut_parts(self, "examples")) or None

    def label_warning(self) -> Optional[str]:
        """KTO weighs each completion against a baseline shared by both classes; with one
        class absent it learns only to push that class one way (TRL warns too)."""
        if not self.seen or (self.desirable and self.undesirable):
            return None
        present, absent = (("desirable", "undesirable") if self.desirable
                           else ("undesirable", "desirable"))
        return (f"warning: all {self.seen} {self.name} examples are {present} (label "
                f"{str(present == 'desirable').lower()}); with no {absent} example KTO only "
                f"pushes {present} completions {'up' if present == 'desirable' else 'down'}")


# How far ahead kl_donors looks for a record with another prompt.
DONOR_SEARCH = 16


def kl_donors(records: Sequence[Any]) -> list[Any]:
    """The record whose completion each record's KL row borrows: the next one in file
    order with another prompt (both answers of a pair are often written next to each
    other, and a KL row must mismatch), wrapping round; the next one when none of the
    following DONOR_SEARCH has another prompt (a single record borrows its own)."""
    n = len(records)

    def donor(i: int) -> Any:
        for k in range(1, min(n, DONOR_SEARCH + 1)):
            if records[(i + k) % n].messages != records[i].messages:
                return records[(i + k) % n]
        return records[(i + 1) % n]
    return [donor(i) for i in range(n)]


def make_unpaired(record: Any, kl_completion: tuple, tokenizer, max_length: int,
                  counts: Optional[UnpairedCounts] = None) -> Optional[UnpairedExample]:
    """Tokenize one example and its KL row, each cut to max_length keeping its start; None
    when the prompt leaves no completion token."""
    tools = list(record.tools) if record.tools else None
    rows, cut = [], False
    for completion in (record.completion, kl_completion):
        ids, mask = encode_side(tokenizer, record.messages, completion, tools, record.where)
        cut = cut or (not rows and len(ids) > max_length)  # the example's own row
        rows.append((np.asarray(ids[:max_length], dtype=np.int32),
                     np.asarray(mask[:max_length], dtype=np.uint8)))
    empty = not rows[0][1][1:].any()
    if counts is not None:
        counts.seen += 1
        counts.desirable += bool(record.label)
        counts.undesirable += not record.label
        counts.truncated += cut and not empty
        if empty:
            counts.no_room += 1
            counts.first_no_room = counts.first_no_room or record.where
    return None if empty else UnpairedExample(record, rows[0], rows[1])


def tokenize_unpaired(records: Iterable[Any], tokenizer, max_length: int, name: str,
                      log: Callable[[str], None]) -> list[UnpairedExample]:
    """A split's examples with their KL rows (donors fixed over the whole split); one
    summary line for truncated and dropped examples."""
    records = list(records)
    counts = UnpairedCounts(name, max_length)
    out = [ex for record, donor in zip(records, kl_donors(records))
           if (ex := make_unpaired(record, donor.completion, tokenizer, max_length, counts))
           is not None]
    if counts.message():
        log(counts.message())
    return out


def tokenize_split(records: Iterable[Any], tokenizer, mask_prompt: bool, max_length: int,
                   name: str, log: Callable[[str], None], limit: str = "max_length") -> list:
    """A split's examples in any format: ``tokenize.tokenize_all``, except that unpaired
    records are tokenized together, each with its KL row."""
    records = iter(records)
    first = next(records, None)
    records = itertools.chain([] if first is None else [first], records)
    if first is not None and first.kind == "unpaired":
        return tokenize_unpaired(records, tokenizer, max_length, name, log)
    return tokenize_all(records, tokenizer, mask_prompt, max_length, name, log, limit)
