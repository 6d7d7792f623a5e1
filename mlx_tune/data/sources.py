"""Where training batches come from: an in-memory epoch plan, or a streaming pass.

A source turns a position (a JSON-able dict) into an endless iterator of
``(batch, position after it, log lines)``. Everything it does is a pure function of the
spec, the data and that position, which is what makes resume exact: ``TrainStream`` keeps
the position of the last batch handed out and restarts a source from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from mlx_tune.data.batch import Batch
from mlx_tune.config.schema import CurriculumStage, QualitySpec
from mlx_tune.data import seeding
from mlx_tune.data.augment import Augmenter
from mlx_tune.data.batching import bucket, pad_batch, pad_pairs, pad_unpaired
from mlx_tune.data.filters import epoch_filter
from mlx_tune.data.records import DataError, iter_lines, line_numbers, parse_line
from mlx_tune.data.tokenize import Example, PairExample, Truncation, make_example
from mlx_tune.data.unpaired import UnpairedExample
from mlx_tune.data.widths import Widths
from mlx_tune.data.packing import batches_of, best_fit, pack_rows

Item = tuple  # (Batch, state dict after this batch, list of log lines)

# Streaming: records are bucketed by length within windows of this many batches.
WINDOW_BATCHES = 16
# Streaming: random indices are drawn from the generator in blocks (fewer numpy calls).
DRAW_BLOCK = 4096


@dataclass(frozen=True)
class Settings:
    """What a source needs from the spec, plus the tokenizer."""

    tokenizer: object
    seed: int
    batch_size: int
    max_length: int
    mask_prompt: bool
    pad_id: int
    stages: Sequence[CurriculumStage]
    quality: QualitySpec
    augmenter: Optional[Augmenter]
    widths: Widths  # shared with validation; a resume replaces its values in place
    pack_length: Optional[int] = None  # packing: rows of this many tokens
    length_setting: str = "max_length"  # what max_length comes from (packing.example_limit)

    def example(self, record, counts: Optional[Truncation] = None) -> Optional[Example]:
        return make_example(record, self.tokenizer, self.mask_prompt, self.max_length, counts)

    def assemble(self, examples: Sequence[Example], epoch: int) -> Batch:
        """Pad examples into a batch, augmenting the ones drawn for this epoch.

        Augmented records are tokenized here, per epoch; the cached un-augmented tokens are
        used otherwise, and also when an augmented record is left with no target after
        truncation (so a batch never shrinks).
        """
        rows = []
        if examples and isinstance(examples[0], PairExample):  # augmentation: sft only
            return pad_pairs(examples, self.pad_id, self.max_length, self.widths)
        if examples and isinstance(examples[0], UnpairedExample):
            return pad_unpaired(examples, self.pad_id, self.max_length, self.widths)
        if self.pack_length is not None:  # examples: a list of rows of examples
            return pack_rows([[self._augmented(ex, epoch) for ex in row] for row in examples],
                             self.pad_id, self.pack_length)
        for ex in examples:
            if self.augmenter is not None:
                rewritten = self.augmenter.apply(ex.record, epoch)
                if rewritten is not None:
                    ex = self.example(rewritten) or ex
            rows.append((ex.ids, ex.mask))
        return pad_batch(rows, self.pad_id, self.max_length, self.widths)

    def _augmented(self, ex: Example, epoch: int) -> tuple:
        if self.augmenter is not None:
            rewritten = self.augmenter.apply(ex.record, epoch)
            if rewritten is not None:
                ex = self.example(rewritten) or ex
        return ex.ids, ex.mask

    def too_few(self, where: str, kept: int, detail: str) -> DataError:
        return DataError(f"{where}: the filters keep {kept} records, fewer than "
                         f"batch_size={self.batch_size} ({detail})")


class MemorySource:
    """All train records tokenized once; each epoch is a plan of length-bucketed batches."""

    mode = "memory"

    def __init__(self, examples: list[Example], settings: Settings):
        self.examples = examples
        self.s = settings
        self.records = len(examples)

    def plan(self, epoch: int) -> tuple[list[list[int]], list[str]]:
        """Example indices of every batch of ``epoch``, and the epoch's filter log line."""
        f = epoch_filter(self.s.stages, self.s.quality, epoch)
        kept = [i for i, ex in enumerate(self.examples) if f.keeps(ex.record, ex.length)]
        if len(kept) < self.s.batch_size:
            raise self.s.too_few(f"epoch {epoch}", len(kept), f.message())
        rng = seeding.rng(self.s.seed, seeding.EPOCH_ORDER, epoch)
        if self.s.pack_length is not None:
            # Packing: a seeded shuffle, best-fit rows, rows shuffled into batches. Each
            # batch entry is a row (a list of example indices).
            lengths = [self.examples[i].length for i in kept]
            rows = best_fit(lengths, rng.permutation(len(kept)).tolist(), self.s.pack_length)
            rows = [[kept[j] for j in row] for row in rows]
            if len(rows) < self.s.batch_size:
                raise self.s.too_few(f"epoch {epoch} (packed into {len(rows)} rows)",
                                     len(kept), f.message())
            return batches_of(rows, self.s.batch_size, rng), [f.message()] if f.active else []
        groups = bucket([self.examples[i].length for i in kept], self.s.batch_size, rng)
        return [[kept[j] for j in g] for g in groups], [f.message()] if f.active else []

    def steps_per_epoch(self) -> int:
        """Batches in epoch 0 (later epochs differ only if a curriculum filters them)."""
        return len(self.plan(0)[0])

    def iterate(self, state: dict) -> Iterator[Item]:
        epoch, position = int(state.get("epoch", 0)), int(state.get("position", 0))
        while True:
            plan, messages = self.plan(epoch)
            for p in range(position, len(plan)):
                if self.s.pack_length is not None:
                    batch = self.s.assemble([[self.examples[i] for i in row]
                                             for row in plan[p]], epoch)
                else:
                    batch = self.s.assemble([self.examples[i] for i in plan[p]], epoch)
                yield batch, {"epoch": epoch, "position": p + 1}, messages
                messages = []
            epoch, position = epoch + 1, 0


class StreamingSource:
    """train.jsonl read line by line once per epoch through a seeded shuffle buffer.

    The buffer shuffles raw lines, so skipping to a resume position costs reading and
    shuffling lines only: nothing skipped is parsed or tokenized. Kept records are
    bucketed by length within windows of WINDOW_BATCHES batches.
    """

    mode = "streaming"

    def __init__(self, path: str | Path, kind: str, settings: Settings, buffer: int,
                 holdout: Optional[float], log_counts: bool = True):
        self.path, self.kind, self.s = path, kind, settings
        self.buffer, self.holdout = buffer, holdout
        self.truncation_logged = not log_counts
        self.records: Optional[int] = None

    def sample_lengths(self, limit: int) -> list[int]:
        """Token lengths of the first ``limit`` train records (choosing bucket widths)."""
        out: list[int] = []
        for line, text in self._lines():
            ex = self.s.example(parse_line(text, self.path, line, self.kind))
            if ex is not None:
                out.append(ex.length)
            if len(out) >= limit:
                break
        return out

    def count(self) -> int:
        """Train records (non-blank lines not held out for validation): one cheap pass.
        (Every line was already parsed and checked by data.preflight before the model
        loaded, so nothing is parsed here; a dataset split is counted by its length.)"""
        self.records = sum(1 for line in line_numbers(self.path)
                           if not seeding.held_out(self.s.seed, line, self.holdout))
        return self.records

    def steps_per_epoch(self) -> int:
        """Records // batch_size: an estimate (each window drops its own remainder, and
        filters are only known once the records are read), so an epoch-based streaming
        run ends within a few batches of the epoch boundary."""
        return (self.records if self.records is not None else self.count()) // self.s.batch_size

    def _lines(self) -> Iterator[tuple[int, str]]:
        for line, text in iter_lines(self.path):
            if not seeding.held_out(self.s.seed, line, self.holdout):
                yield line, text

    def shuffled(self, epoch: int) -> Iterator[tuple[int, str]]:
        """The epoch's shuffled stream of (line, text)."""
        rng = seeding.rng(self.s.seed, seeding.STREAM_SHUFFLE, epoch)
        buf: list = []
        draws, k = [], 0
        for item in self._lines():
            if len(buf) < self.buffer:
                buf.append(item)
                continue
            if k == len(draws):
                draws, k = rng.integers(0, self.buffer, DRAW_BLOCK).tolist(), 0
            j = draws[k]
            k += 1
            yield buf[j]
            buf[j] = item
        for j in rng.permutation(len(buf)).tolist():
            yield buf[j]

    def iterate(self, state: dict) -> Iterator[Item]:
        epoch = int(state.get("epoch", 0))
        consumed = int(state.get("consumed", 0))
        skip = int(state.get("batch_in_window", 0))
        position = int(state.get("position", 0))
        pending: list[str] = []
        window_size = WINDOW_BATCHES * self.s.batch_size
        while True:
            resumed = consumed > 0
            f = epoch_filter(self.s.stages, self.s.quality, epoch)
            counts = Truncation("train", self.s.max_length, self.s.length_setting)
            stream = self.shuffled(epoch)
            for _ in range(consumed):  # replay to the saved position, parsing nothing
                next(stream, None)
            start, done = consumed, False
            while not done:
                window, taken = [], 0
                while len(window) < window_size:
                    item = next(stream, None)
                    if item is None:
                        done = True
                        break
                    taken += 1
                    record = parse_line(item[1], self.path, item[0], self.kind)
                    ex = self.s.example(record, counts)
                    if ex is not None and f.keeps(ex.record, ex.length):
                        window.append(ex)
                rng = seeding.rng(self.s.seed, seeding.STREAM_WINDOW, epoch, start)
                groups = bucket([ex.length for ex in window], self.s.batch_size, rng) \
                    if len(window) >= self.s.batch_size else []
                for b in range(skip, len(groups)):
                    batch = self.s.assemble([window[i] for i in groups[b]], epoch)
                    position += 1
                    last = b + 1 == len(groups)
                    # After a window's last batch, point past the window: no re-tokenizing.
                    after = {"epoch": epoch, "position": position,
                             "consumed": start + taken if last else start,
                             "batch_in_window": 0 if last else b + 1}
                    yield batch, after, pending
                    pending = []
                skip, start = 0, start + taken
            if position == 0:
                raise self.s.too_few(f"{self.path} (streaming epoch {epoch})", f.kept,
                                     f.message())
            if not resumed:
                # Counts are only whole for a pass read from its start.
                if f.active:
                    pending.append(f.message())
                if not self.truncation_logged and counts.message():
                    pending.append(counts.message())
                self.truncation_logged = True
            epoch, consumed, position = epoch + 1, 0, 0
