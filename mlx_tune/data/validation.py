"""Validation and test data: lazy, fixed, deterministic.

``LazyValidation`` opens nothing until ``batches()`` is first called (a run that never
evaluates never pays for it), then keeps the same list of batches for the whole run, so
every evaluation measures the same tokens and validation losses are comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from mlx_tune.data.batch import Batch
from mlx_tune.config.schema import Spec
from mlx_tune.data import seeding
from mlx_tune.data.batching import bucket, pad_batch, pad_id_of, pad_pairs, pad_unpaired
from mlx_tune.data.records import (Record, first_format, is_split, iter_lines, iter_records,
                                   parse_line)
from mlx_tune.data.tokenize import Example, PairExample, unwrap
from mlx_tune.data.unpaired import UnpairedExample, tokenize_split
from mlx_tune.data.widths import Widths
from mlx_tune.data.packing import batches_of, best_fit, example_limit, pack_rows


def _batches(examples: list[Example], batch_size: int, pad_id: int, max_length: int,
             widths: Widths, order_seed: Optional[int] = None) -> list[Batch]:
    """Length-sorted batches in the run's widths, optionally in a seeded order. The
    incomplete last batch is kept, padded with empty rows to ``batch_size``: one shape
    fewer to compile, and empty rows weigh nothing in the sums."""
    groups = bucket([ex.length for ex in examples], batch_size, None, drop_last=False)
    if order_seed is not None:
        # A seeded order makes "the first N batches" a spread of lengths, not the N
        # shortest; fixed by the seed, so it is the same subset every evaluation.
        perm = seeding.rng(order_seed, seeding.VALID_ORDER).permutation(len(groups))
        groups = [groups[i] for i in perm]
    if examples and isinstance(examples[0], (PairExample, UnpairedExample)):
        # No all-padding examples: an empty one would still count in the loss.
        pad = pad_pairs if isinstance(examples[0], PairExample) else pad_unpaired
        return [pad([examples[i] for i in g], pad_id, max_length, widths) for g in groups]
    return [pad_batch([(examples[i].ids, examples[i].mask) for i in g], pad_id, max_length,
                      widths, size=batch_size) for g in groups]


def _packed(examples: list[Example], batch_size: int, pad_id: int, pack_length: int
            ) -> list[Batch]:
    """Examples best-fit into rows in file order (no randomness), batches of rows, the
    last padded with empty rows."""
    rows = best_fit([ex.length for ex in examples], range(len(examples)), pack_length)
    return [pack_rows([[(examples[i].ids, examples[i].mask) for i in row] for row in group],
                      pad_id, pack_length, size=batch_size)
            for group in batches_of(rows, batch_size, None)]


class LazyValidation:
    """Validation batches, read and tokenized on first use.

    Sources: a validation file; or train.jsonl lines held out by ``val_split`` (a seeded
    hash of each line number, so the same lines every run); or records already read.
    """

    def __init__(self, path: str | Path, spec: Spec, tokenizer, *,
                 log: Callable[[str], None] = print, holdout: Optional[float] = None,
                 records: Optional[list[Record]] = None, widths: Optional[Widths] = None):
        self.path = path if is_split(path) else Path(path)
        self._spec = spec
        self._tokenizer = unwrap(tokenizer)
        self._log = log
        self._holdout = holdout
        self._records = records
        # The training data's widths (shared, so a resume's widths apply here too).
        self._widths = widths or Widths.choose((), spec.max_length, mode=spec.bucket_widths)
        self._batches: Optional[list[Batch]] = None
        self.name = "val_split" if holdout or records is not None else "valid"

    def _iter_records(self) -> Iterator[Record]:
        if self._records is not None:
            yield from self._records
        elif self._holdout:
            kind = first_format(self.path)
            for line, text in iter_lines(self.path):
                if seeding.held_out(self._spec.seed, line, self._holdout):
                    yield parse_line(text, self.path, line, kind)
        else:
            yield from iter_records(self.path)

    def batches(self) -> list[Batch]:
        """The fixed validation batches: the first ``val_batches`` (-1 = all)."""
        if self._batches is None:
            spec = self._spec
            limit, setting = example_limit(spec)
            examples = tokenize_split(self._iter_records(), self._tokenizer, spec.mask_prompt,
                                    limit, self.name, self._log, setting)
            if spec.packing:  # packed like training: the same single shape
                batches = _packed(examples, spec.batch_size, pad_id_of(self._tokenizer),
                                  spec.pack_length or spec.max_length)
            else:
                batches = _batches(examples, spec.batch_size, pad_id_of(self._tokenizer),
                                   spec.max_length, self._widths, order_seed=spec.seed)
            if spec.val_batches >= 0:
                batches = batches[:spec.val_batches]
            if not batches and spec.val_batches != 0:
                self._log(f"{self.path}: no usable validation records; evaluation is skipped")
            self._batches = batches
        return list(self._batches)

    def first_prompts(self, n: int) -> list[list[dict]]:
        """The first n validation conversations without their final assistant answer."""
        return [messages for messages, _ in self.first_samples(n)]

    def first_samples(self, n: int) -> list[tuple[list[dict], Optional[list[dict]]]]:
        """``first_prompts`` with each record's tools (function specs, or None): what
        the chat template needs to render the prompt as training rendered it."""
        out: list[tuple[list[dict], Optional[list[dict]]]] = []
        if n <= 0:
            return out
        for record in self._iter_records():
            if not record.messages:
                continue  # text records have no prompt to complete
            messages = [dict(m) for m in record.messages]
            # A preference record's messages are its prompt alone: no answer to drop.
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                       default=len(messages))
            if last == 0:
                continue
            out.append((messages[:last], list(record.tools) if record.tools else None))
            if len(out) == n:
                break
        return out


def load_eval_file(path: Any, spec: Spec, tokenizer, *,
                   log: Callable[[str], None] = print,
                   widths: Optional[Widths] = None) -> list[Batch]:
    """Every record of a test file as length-sorted batches (the last padded with empty
    rows); widths chosen from the file's own lengths unless given."""
    tokenizer = unwrap(tokenizer)
    examples = tokenize_split(iter_records(path), tokenizer, spec.mask_prompt, spec.max_length,
                            path.split if is_split(path) else Path(path).stem, log)
    if widths is None:
        widths = Widths.choose([ex.length for ex in examples], spec.max_length,
                               mode=spec.bucket_widths)
    return _batches(examples, spec.batch_size, pad_id_of(tokenizer), spec.max_length, widths)
