"""JSONL readers and record validation: chat (incl. tool calls and ShareGPT), completions
and text formats.

Every problem is a one-line ``DataError`` naming ``file:line`` and what was expected, so a
bad record costs a second at startup rather than a crash hours into a run. Lines are read
as bytes and decoded one at a time so that even an encoding error names its line, and a
file is never held whole in memory by the readers (streaming builds on ``iter_lines``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from mlx_tune.data.messages import (ROLES, MessageError, from_sharegpt, parse_messages,
                                    parse_preference, parse_tools, parse_unpaired)
from mlx_tune.errors import UserError

FORMATS = ("chat", "completions", "text", "preference", "unpaired")
VALID_NAMES = ("valid.jsonl", "val.jsonl")


class DataError(UserError, ValueError):
    """Data that cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class Record:
    """One parsed record. Completions are stored as a two-turn conversation."""

    line: int  # 1-based line number in its file: the record's stable identity
    kind: str  # "chat" | "completions" | "text" | "preference" | "unpaired"
    messages: Optional[tuple] = None  # tuple of {"role", "content", ...} dicts (chat, completions)
    text: Optional[str] = None  # text records only
    quality: Optional[float] = None
    difficulty: Optional[int] = None
    extra: dict = field(default_factory=dict, compare=False)  # other fields, kept verbatim
    source: str = field(default="", compare=False)  # the file, for error messages
    tools: Optional[tuple] = None  # function specs passed to the chat template (chat only)
    dialect: str = field(default="", compare=False)  # "sharegpt" when read from conversations
    row: Optional[int] = field(default=None, compare=False)  # 0-based, Hugging Face datasets
    # Preference records: ``messages`` is the prompt; the two completions, as messages.
    chosen: Optional[tuple] = None
    rejected: Optional[tuple] = None
    # Unpaired (KTO) records: ``messages`` is the prompt, ``completion`` its one answer
    # and ``label`` whether that answer is desirable.
    completion: Optional[tuple] = None
    label: Optional[bool] = None

    @property
    def where(self) -> str:
        if self.row is not None:
            return f"{self.source} row {self.row}"
        return f"{self.source}:{self.line}" if self.source else f"record at line {self.line}"

    @property
    def user_turns(self) -> int:
        return sum(1 for m in self.messages or () if m["role"] == "user")


@dataclass(frozen=True)
class DataFiles:
    """The files of a data directory."""

    directory: Path
    train: Path
    valid: Optional[Path]
    test: Optional[Path]


def find_files(directory: str | Path) -> DataFiles:
    """Locate train.jsonl (required), valid.jsonl or val.jsonl, and test.jsonl."""
    d = Path(directory)
    expected = "expected train.jsonl, and optionally valid.jsonl (or val.jsonl) and test.jsonl"
    if not d.is_dir():
        raise DataError(f"{d}: data directory not found ({expected})")
    train = d / "train.jsonl"
    _check_regular(train)
    if not train.is_file():
        raise DataError(f"{d}: no train.jsonl in the data directory ({expected})")
    for n in VALID_NAMES + ("test.jsonl",):
        _check_regular(d / n)
    valids = [d / n for n in VALID_NAMES if (d / n).is_file()]
    if len(valids) > 1:
        # Silently preferring one would evaluate on data the user may not expect.
        raise DataError(f"{d}: both valid.jsonl and val.jsonl exist; keep one of them")
    test = d / "test.jsonl"
    return DataFiles(d, train, valids[0] if valids else None, test if test.is_file() else None)


def find_test_only(directory: str | Path) -> Optional[Path]:
    """test.jsonl of a data directory, for scoring alone (`evaluate --data DIR`): no
    train.jsonl is needed to score a test set. None when the directory has none."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: data directory not found (expected test.jsonl in it)")
    test = d / "test.jsonl"
    _check_regular(test)
    return test if test.is_file() else None


def _check_regular(path: Path) -> None:
    """A name that exists but is no readable regular file gets its own message (a FIFO
    would block the reader forever; a dangling link would read as "missing")."""
    if path.is_symlink() and not path.exists():
        raise DataError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist")
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
        raise DataError(f"{path}: {kind}; expected a JSONL file")


def content_hash(path: Any) -> str:
    """``<size>:<blake2b>`` of a file's bytes: a resume across changed training data is
    caught even when the record count stays the same (about 1 s per GB). A dataset split
    gives the same hash over the files behind it, streamed or not."""
    if is_split(path):
        return path.content_hash()
    h = hashlib.blake2b(digest_size=16)
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return f"{size}:{h.hexdigest()}"


def is_split(path: Any) -> bool:
    """A Hugging Face dataset split (data/hf.py's HFSplit) rather than a JSONL file: it
    hands out rows as dicts, numbered from 1 like lines."""
    return hasattr(path, "lines") and hasattr(path, "where")


def where_of(path: Any, line: int) -> str:
    return path.where(line) if is_split(path) else f"{path}:{line}"


def line_numbers(path: Any) -> Iterator[int]:
    """The line numbers of a file's records (a split's rows), without parsing them."""
    if is_split(path):
        return path.line_numbers()
    return (number for number, _ in iter_lines(path))


def iter_lines(path: Any) -> Iterator[tuple[int, Any]]:
    """(line number, text) of every non-blank line, read one line at a time; a dataset
    split's rows are (row index + 1, row dict)."""
    if is_split(path):
        yield from path.lines()
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({e.reason})") from None
            if number == 1:
                text = text.lstrip("\ufeff")  # editors on Windows write a BOM
            if text.strip():
                yield number, text


def detect_format(obj: Any) -> Optional[str]:
    if not isinstance(obj, dict):
        return None
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "label" in obj:
        return "unpaired"
    if "messages" in obj or "conversations" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "completions"
    if "text" in obj:
        return "text"
    return None


def _number(obj: dict, key: str, where: str, kind: type) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok:
        what = "a number" if kind is float else "an integer"
        raise DataError(f"{where}: '{key}' must be {what}, got {value!r}")
    return kind(value)


def parse_line(text: Any, path: Any, line: int, expect: Optional[str] = None) -> Record:
    """Parse and validate one JSONL line (or a dataset row, already a dict). ``expect`` is
    the file's format (from line 1)."""
    where = where_of(path, line)
    row = line - 1 if is_split(path) else None
    if isinstance(text, dict):
        obj = text
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply to be a training record") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    kind = detect_format(obj)
    if kind is None:
        raise DataError(f"{where}: record has none of 'messages', 'conversations' (ShareGPT), "
                        "'prompt'/'completion', 'text', 'prompt'/'chosen'/'rejected', "
                        "'prompt'/'completion'/'label'")
    if expect == "unpaired" and kind == "completions":
        kind = expect  # an unpaired file's record without its 'label': say that
    if expect is not None and kind != expect:
        raise DataError(f"{where}: record is in {kind} format but the file is in {expect} "
                        "format (detected from its first record); one format per file")
    quality = _number(obj, "quality", where, float)
    difficulty = _number(obj, "difficulty", where, int)
    known = {"messages", "conversations", "tools", "prompt", "completion", "text", "quality",
             "difficulty", "chosen", "rejected", "label"}
    extra = {k: v for k, v in obj.items() if k not in known}
    if kind in ("preference", "unpaired"):
        try:
            fields = parse_preference(obj) if kind == "preference" else parse_unpaired(obj)
        except MessageError as e:
            raise DataError(f"{where}: {e}") from None
        return Record(line, kind, quality=quality, difficulty=difficulty, extra=extra,
                      source=str(path), row=row, **fields)
    if kind == "chat":
        sharegpt = "messages" not in obj
        try:
            raw = from_sharegpt(obj["conversations"]) if sharegpt else obj["messages"]
            messages = parse_messages(raw, sharegpt=sharegpt)
            tools = parse_tools(obj.get("tools"))
        except MessageError as e:
            raise DataError(f"{where}: {e}") from None
        return Record(line, kind, messages=messages, quality=quality, difficulty=difficulty,
                      extra=extra, source=str(path), tools=tools, row=row,
                      dialect="sharegpt" if sharegpt else "")
    if "tools" in obj:
        raise DataError(f"{where}: 'tools' needs chat records ('messages'), not {kind} records")
    if kind == "completions":
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: completions records need string 'prompt' and "
                            "'completion' fields")
        messages = ({"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion})
        return Record(line, kind, messages=messages, quality=quality, difficulty=difficulty,
                      extra=extra, source=str(path), row=row)
    if not isinstance(obj["text"], str):
        raise DataError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
    return Record(line, kind, text=obj["text"], quality=quality, difficulty=difficulty,
                  extra=extra, source=str(path), row=row)


def iter_records(path: str | Path) -> Iterator[Record]:
    """Parse a file record by record; the first record fixes the file's format."""
    kind = None
    for line, text in iter_lines(path):
        record = parse_line(text, path, line, kind)
        kind = record.kind
        yield record
    if kind is None:
        raise DataError(f"{path}: " + ("split has no rows" if is_split(path) else
                    "file is empty (expected one JSON record per line)"))


def read_records(path: str | Path) -> list[Record]:
    """Every record of a file, validated."""
    return list(iter_records(path))


def first_format(path: str | Path) -> str:
    """The format of a file, from its first record (parses only that line)."""
    for line, text in iter_lines(path):
        return parse_line(text, path, line).kind
    raise DataError(f"{path}: " + ("split has no rows" if is_split(path) else
                    "file is empty (expected one JSON record per line)"))
