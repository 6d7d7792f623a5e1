"""Check the data before any model loads: a bad record costs a second, not a model load.

Reads every record of the training data, in every mode: streaming too (records are parsed
and checked, not kept), so a bad line found hours into a streaming run never ends a night
and then every resume at the same step. The validation and test files are checked from
their first record only: they stay lazy (a 1 GB validation file costs nothing at start-up),
are read in full at the first evaluation, and a bad record found there saves the step's
checkpoint before the run stops (exit 10), so resuming is safe. It reports what it recognised
(ShareGPT conversations, tool-calling records) and, when the data uses tools, asks the
model's chat template to render a tool conversation, so a template that would silently
drop the tools is refused by name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from mlx_tune.config.schema import Spec
from mlx_tune.data.messages import uses_tools
from mlx_tune.data.hf import find_data
from mlx_tune.data.tokenize import PairCounts, make_pair
from mlx_tune.data.unpaired import UnpairedCounts, kl_donors, make_unpaired
from mlx_tune.data.records import DataError, Record, is_split, iter_records
from mlx_tune.data.chat_template import check_tool_template
from mlx_tune.data.tokenize import unwrap


@dataclass
class FileReport:
    path: str
    records: int = 0
    sharegpt: int = 0
    tools: int = 0
    first_tool: Optional[str] = None  # file:line of the first record using tools
    kinds: set = field(default_factory=set)

    def add(self, record: Record) -> None:
        self.records += 1
        self.kinds.add(record.kind)
        if record.dialect == "sharegpt":
            self.sharegpt += 1
        if record.messages and uses_tools(record.messages, record.tools):
            self.tools += 1
            self.first_tool = self.first_tool or record.where

    def notes(self, complete: bool) -> list[str]:
        some = "" if complete else " (from its first record; streaming reads the rest later)"
        out = []
        if self.sharegpt:
            out.append(f"{self.path}: {self.sharegpt} ShareGPT records ('conversations' with "
                       "from/value) read as chat messages: human -> user, gpt -> assistant, "
                       f"system -> system, tool -> tool{some}")
        if self.tools:
            out.append(f"{self.path}: {self.tools} tool-calling records, rendered by the chat "
                       f"template with their 'tools'{some}")
        return out


def _records(path, first_only: bool) -> Iterator[Record]:
    for record in iter_records(path):
        yield record
        if first_only:
            return


PAIRED_OBJECTIVES = ("dpo", "orpo", "simpo")
UNPAIRED_OBJECTIVES = ("kto",)


def check_kind(spec: Spec, record: Record) -> None:
    """The objective and the data must agree: pairs for a paired objective, labelled
    completions for kto, and each only there."""
    paired, unpaired = spec.objective in PAIRED_OBJECTIVES, spec.objective in UNPAIRED_OBJECTIVES
    if paired and record.kind != "preference":
        raise DataError(f"{record.where}: objective '{spec.objective}' needs preference "
                        f"records ('prompt', 'chosen', 'rejected'), not {record.kind} records")
    if unpaired and record.kind != "unpaired":
        raise DataError(f"{record.where}: objective '{spec.objective}' needs unpaired records "
                        f"('prompt', 'completion', 'label'), not {record.kind} records")
    if not paired and record.kind == "preference":
        raise DataError(f"{record.where}: a preference record ('chosen'/'rejected') but the "
                        f"objective is '{spec.objective}'; set objective: dpo, orpo or simpo")
    if not unpaired and record.kind == "unpaired":
        raise DataError(f"{record.where}: an unpaired record ('completion'/'label') but the "
                        f"objective is '{spec.objective}'; set objective: kto")


def _check_unpaired(spec: Spec, tokenizer, records: list[Record], path: str,
                    log: Callable[[str], None]) -> None:
    """Tokenize every training example and its KL row as training will: counts, the
    label-class warning, and a refusal when no example has room for its completion."""
    counts = UnpairedCounts("train", spec.max_length)
    for record, donor in zip(records, kl_donors(records)):
        make_unpaired(record, donor.completion, tokenizer, spec.max_length, counts)
    for line in (counts.message(), counts.label_warning()):
        if line:
            log(f"{path}: {line}")
    if counts.seen and counts.no_room == counts.seen:
        raise DataError(f"{path}: every example's prompt leaves no room for its completion "
                        f"within max_length={spec.max_length} (the first at "
                        f"{counts.first_no_room}); raise max_length")


def check_data(spec: Spec, tokenizer, log: Callable[[str], None] = print) -> list[FileReport]:
    """Validate every data file of ``spec``; raise DataError on the first problem."""
    files = find_data(spec)
    tokenizer = unwrap(tokenizer)
    reports = []
    for path in (files.train, files.valid, files.test):
        if path is None:
            continue
        first_only = path is not files.train  # evaluation files stay lazy (module docstring)
        report = FileReport(str(path if is_split(path) else Path(path)))
        pairs, unpaired = PairCounts("train", spec.max_length), []
        for record in _records(path, first_only):
            if not report.records:
                check_kind(spec, record)
            report.add(record)
            if record.kind == "preference" and not first_only:
                make_pair(record, tokenizer, spec.max_length, pairs)
            if record.kind == "unpaired" and not first_only:
                unpaired.append(record)
        if unpaired:
            _check_unpaired(spec, tokenizer, unpaired, report.path, log)
        if pairs.message():
            log(f"{report.path}: {pairs.message()}")
        if pairs.seen and pairs.no_room == pairs.seen:
            raise DataError(f"{report.path}: every pair's prompt leaves no room for its "
                            f"completion within max_length={spec.max_length} (the first at "
                            f"{pairs.first_no_room}); raise max_length")
        if report.first_tool:
            check_tool_template(tokenizer, report.first_tool)
        for note in report.notes(not first_only):
            log(note)
        reports.append(report)
    return reports
