"""The data layer: JSONL records (or Hugging Face dataset rows) -> token ids and masks -> numpy ``Batch``es.

    bundle = load_data(spec, tokenizer, log=print)
    batch = bundle.train.next_batch()          # forever; the loop stops by step count
    state = bundle.train.state_dict()          # JSON-able; load_state_dict() resumes exactly
    val = bundle.valid.batches() if bundle.valid else None   # read on first use, then fixed
    bundle.close()

Modules: ``records`` (readers, validation), ``tokenize`` (chat template, masks,
truncation), ``unpaired`` (KTO examples and their KL rows), ``batching`` (buckets,
padding), ``filters`` (curriculum, quality),
``augment``, ``hf`` (Hugging Face datasets), ``sources`` (in-memory epochs, streaming passes), ``stream`` (TrainStream,
prefetch), ``validation`` (LazyValidation, test files), ``seeding``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from mlx_tune.config.schema import CurriculumStage, Spec
from mlx_tune.data import seeding
from mlx_tune.data.augment import make_augmenter
from mlx_tune.data.batching import pad_id_of
from mlx_tune.data.hf import describe, find_data
from mlx_tune.data.packing import example_limit
from mlx_tune.data.records import (DataError, DataFiles, Record, content_hash, first_format,
                                   read_records)
from mlx_tune.data.sources import MemorySource, Settings, StreamingSource
from mlx_tune.data.stream import TrainStream
from mlx_tune.data.tokenize import unwrap
from mlx_tune.data.unpaired import tokenize_split
from mlx_tune.data.validation import LazyValidation, load_eval_file
from mlx_tune.data.widths import Widths

__all__ = ["DataBundle", "DataError", "LazyValidation", "Record", "TrainStream", "Widths",
           "load_data", "load_eval_file", "content_fingerprint"]

# Streaming: bucket widths are chosen from the lengths of this many first records at most
# (or the shuffle buffer, if smaller): the whole file is never tokenized up front.
WIDTH_SAMPLE = 4096


def content_fingerprint(spec: Spec) -> dict:
    """What a checkpoint records of the training data's content (see
    checkpoint.resume.RESUME_CAUTION_FIELDS): a changed train.jsonl with the same record count
    would otherwise resume at a data position that now means other records."""
    return {"data_content": {"train": content_hash(find_data(spec).train)}}


@dataclass
class DataBundle:
    train: TrainStream
    valid: Optional[LazyValidation]
    train_records: int  # before per-epoch filters
    widths: Widths  # the run's padded widths: train, validation and resume share them

    def close(self) -> None:
        self.train.close()


def _quiet(_: str) -> None:
    pass


def load_data(spec: Spec, tokenizer, *, rank: int = 0, world_size: int = 1,
              log: Callable[[str], None] = print) -> DataBundle:
    """Open a data directory for training.

    Every rank draws the same global batch sequence (the caller takes
    ``batch.split(world_size)[rank]``); only rank 0 logs, so lines are not repeated.
    """
    if rank != 0:
        log = _quiet
    tokenizer = unwrap(tokenizer)
    files = find_data(spec)
    describe(files, log)
    if spec.batch_size % world_size:
        raise DataError(f"batch_size={spec.batch_size} cannot be split evenly across "
                        f"{world_size} data-parallel ranks")
    fraction = spec.val_split if not isinstance(spec.val_split, str) else None
    holdout = fraction if files.valid is None and fraction else None
    if files.valid is not None and fraction:
        log(f"val_split={spec.val_split} ignored: validating on {files.valid}")
    widths = Widths.choose((), spec.max_length, mode=spec.bucket_widths)
    pack_length = (spec.pack_length or spec.max_length) if spec.packing else None
    limit, setting = example_limit(spec)
    settings = Settings(
        tokenizer=tokenizer, seed=spec.seed, batch_size=spec.batch_size,
        max_length=limit, length_setting=setting, mask_prompt=spec.mask_prompt,
        pad_id=pad_id_of(tokenizer),
        stages=[CurriculumStage(**s) if isinstance(s, dict) else s for s in spec.curriculum],
        quality=spec.quality,
        augmenter=make_augmenter(spec.augmentation, spec.seed, files.directory),
        widths=widths, pack_length=pack_length)

    opened = (_streaming(files, spec, settings, holdout, log) if spec.streaming
              else _in_memory(files, spec, settings, holdout, log))
    count, held = opened.count, opened.held
    if count < spec.batch_size:
        raise DataError(f"{files.train}: {count} usable training records, fewer than "
                        f"batch_size={spec.batch_size}")
    valid = _validation(files, spec, tokenizer, widths, holdout, held, log)

    mode = "streaming" if spec.streaming else "in memory"
    split = f", {len(held)} held out by val_split" if held else ""
    log(f"train: {count} {opened.kind} records from {files.train} ({mode}{split})")
    if widths.chooser is None:
        log(widths.describe())
    train = TrainStream(opened.source, spec.prefetch, log, seed=spec.seed, widths=widths)
    return DataBundle(train, valid, count, widths)


@dataclass
class _Opened:
    source: MemorySource | StreamingSource
    count: int  # usable training records (streaming: lines, nothing parsed yet)
    kind: str  # the records' format
    held: Optional[list[Record]] = None  # in memory: the records val_split holds out


def _streaming(files: DataFiles, spec: Spec, settings: Settings, holdout: Optional[float],
               log: Callable[[str], None]) -> _Opened:
    """Records read pass by pass; 'auto' widths chosen on first use from a sample."""
    kind = first_format(files.train)
    source = StreamingSource(files.train, kind, settings, spec.shuffle_buffer, holdout)
    count = source.count()  # a line count: nothing is parsed or tokenized yet
    if spec.bucket_widths == "auto":
        def choose(source: StreamingSource = source) -> Widths:
            sample = source.sample_lengths(min(spec.shuffle_buffer, WIDTH_SAMPLE))
            chosen = Widths.choose(sample, spec.max_length, origin=(
                f"chosen from the lengths of the first {len(sample)} streamed records"))
            log(chosen.describe())
            return chosen
        settings.widths.chooser = choose
    return _Opened(source, count, kind)


def _in_memory(files: DataFiles, spec: Spec, settings: Settings, holdout: Optional[float],
               log: Callable[[str], None]) -> _Opened:
    """Every record read and tokenized up front; widths chosen from all their lengths."""
    records = read_records(files.train)
    kind, held = records[0].kind, None
    if holdout:
        held = [r for r in records if seeding.held_out(spec.seed, r.line, holdout)]
        records = [r for r in records if not seeding.held_out(spec.seed, r.line, holdout)]
    examples = tokenize_split(records, settings.tokenizer, spec.mask_prompt, settings.max_length,
                            "train", log, settings.length_setting)
    chosen = Widths.choose([ex.length for ex in examples], spec.max_length,
                           mode=spec.bucket_widths,
                           origin=f"chosen from {len(examples)} training lengths")
    widths = settings.widths
    widths.set(chosen.values, chosen.origin)
    if settings.pack_length is not None:  # every row, train and validation, is that wide
        widths.set((settings.pack_length,), f"packing: rows of {settings.pack_length} tokens")
    return _Opened(MemorySource(examples, settings), len(examples), kind, held)


def _validation(files: DataFiles, spec: Spec, tokenizer, widths: Widths,
                holdout: Optional[float], held: Optional[list[Record]],
                log: Callable[[str], None]) -> Optional[LazyValidation]:
    """valid.jsonl when there is one, else the val_split hold-out (streaming: its lines
    read on first use), else none."""
    if files.valid is not None:
        return LazyValidation(files.valid, spec, tokenizer, log=log, widths=widths)
    if holdout and held is None:
        return LazyValidation(files.train, spec, tokenizer, log=log, holdout=holdout,
                              widths=widths)
    if held:
        return LazyValidation(files.train, spec, tokenizer, log=log, records=held,
                              widths=widths)
    log("no validation data: evaluation is skipped")
    return None
