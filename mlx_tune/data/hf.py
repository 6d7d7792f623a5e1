"""Hugging Face datasets as training data: a Hub dataset id or a local dataset directory.

``data:`` names a directory of JSONL files (records.find_files), or, through the optional
``datasets`` library:

- a Hub dataset id (``org/name``), located in (or fetched into) the Hugging Face cache by
  ``huggingface_hub.snapshot_download(repo_type="dataset")``, exactly as models/hub.py does
  for models, so ``HF_HUB_OFFLINE`` and the shared cache mean the same for both;
- a local directory of parquet / JSON lines / arrow files (``datasets.load_dataset``);
- a ``Dataset.save_to_disk`` directory (``datasets.load_from_disk``).

Each split becomes an ``HFSplit``: rows handed out one at a time as dicts numbered from 1,
which the JSONL record parser (records.parse_line) validates like lines, so every format
(chat, tool calls, ShareGPT, completions, text) works and errors name the dataset, split
and row. Nothing is read until a split is iterated: the train split is opened when
training starts, the validation split at the first evaluation. Arrow-backed datasets are
memory-mapped and streamed row by row; with ``streaming: true`` the files are read as a
``datasets`` IterableDataset, never converted to arrow.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from mlx_tune.data.records import VALID_NAMES, DataError, DataFiles, find_files
from mlx_tune.errors import first_line

VALID_SPLITS = ("validation", "valid", "val")
TEST_SPLITS = ("test",)
# What a training run needs from a dataset repo: data files and the metadata that says how
# to read them, not images or model files that some dataset repos also carry.
DATA_PATTERNS = ["*.parquet", "*.jsonl", "*.json", "*.arrow", "*.csv", "*.jsonl.gz",
                 "*.json.gz", "*.jsonl.zst", "*.md"]
_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow", ".csv", ".gz", ".zst")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _strip_none(value: Any) -> Any:
    """Drop None-valued keys, recursively. Arrow gives every row of a column one struct
    type, the union of the keys of all rows: a message without tool calls comes back with
    ``tool_calls: None``, a tool's arguments with every other tool's argument names set to
    None. Dropping them restores each row as it was written."""
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


class HFSplit:
    """One split of a dataset, read lazily; quacks like a data file for records.py."""

    def __init__(self, name: str, split: str, source: "DatasetSource"):
        self.name, self.split, self._source = name, split, source
        self.rows_read = 0  # rows handed out so far (tests check laziness with it)

    def __str__(self) -> str:
        return f"dataset {self.name} split '{self.split}'"

    def __repr__(self) -> str:
        return f"HFSplit({self.name!r}, {self.split!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFSplit) and (other.name, other.split) == (self.name, self.split)

    def __hash__(self) -> int:
        return hash((self.name, self.split))

    def where(self, line: int) -> str:
        return f"{self} row {line - 1}"

    @property
    def dataset(self) -> Any:
        return self._source.splits()[self.split]

    def lines(self) -> Iterator[tuple[int, dict]]:
        fields = self._source.fields
        for index, row in enumerate(self.dataset):
            self.rows_read += 1
            row = dict(row)
            for ours, theirs in fields.items():
                if theirs in row and theirs != ours:
                    row[ours] = row.pop(theirs)
            yield index + 1, _strip_none(row)

    def content_hash(self) -> str:
        """``<size>:<blake2b>`` of the files behind this split, read the same way whether
        the split is streamed or loaded (the datasets library's fingerprint of a streamed
        split does not follow its data, so a rewritten split would resume unnoticed)."""
        h = hashlib.blake2b(digest_size=16)
        size = 0
        for path in self._source.split_files(self.split):
            h.update(f"{path.name}\0".encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                    size += len(chunk)
        return f"{size}:{h.hexdigest()}"

    def line_numbers(self) -> Iterator[int]:
        """Row numbers without decoding rows, when the dataset knows its length."""
        try:
            return iter(range(1, len(self.dataset) + 1))
        except TypeError:  # an IterableDataset: count by reading
            return (n for n, _ in self.lines())


class DatasetSource:
    """A dataset id or directory, opened on first use (all splits: one load)."""

    def __init__(self, name: str, fields: dict, streaming: bool):
        self.name, self.fields, self.streaming = name, dict(fields), streaming
        self._splits: Optional[dict] = None
        self.folder: Optional[Path] = None  # the local directory or cached snapshot read

    def splits(self) -> dict:
        if self._splits is None:
            self.folder, self._splits = _load(self.name, self.streaming)
            self._check_fields()
        return self._splits

    def split_files(self, split: str) -> list[Path]:
        """The files a split is read from, in a stable order: the arrow files of a
        save_to_disk directory, else the data files the datasets library resolves."""
        self.splits()
        folder = self.folder
        if (folder / "dataset_dict.json").is_file():
            return sorted((folder / split).glob("*.arrow"))
        if (folder / "state.json").is_file():
            return sorted(folder.glob("*.arrow"))
        builder = _datasets().load_dataset_builder(str(folder))
        return sorted(Path(f) for f in (builder.config.data_files or {}).get(split, []))

    def _check_fields(self) -> None:
        for split, ds in self._splits.items():
            columns = getattr(ds, "column_names", None)
            if not columns:  # a streamed dataset may not know its columns before reading
                continue
            for ours, theirs in self.fields.items():
                if theirs not in columns:
                    raise DataError(f"data_fields.{ours}: dataset {self.name} split '{split}' "
                                    f"has no column '{theirs}' (columns: {', '.join(columns)})")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("reading a Hugging Face dataset needs the optional 'datasets' "
                        "package: pip install 'mlx-tune[datasets]'") from None
    return datasets


def _snapshot(repo_id: str) -> Path:
    """The dataset repo in the Hugging Face cache (fetched first when the Hub answers)."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    from mlx_tune.models.hub import fetch_snapshot, hf_cache_dir, hf_offline

    offline = hf_offline()
    try:
        folder = fetch_snapshot(repo_id, repo_type="dataset", allow_patterns=DATA_PATTERNS)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        folder = "datasets--" + repo_id.replace("/", "--")
        raise DataError(
            f"dataset '{repo_id}' is not in the local Hugging Face cache ({hf_cache_dir()}) and "
            f"{why}: on a machine with network run `hf download {repo_id} --repo-type dataset` "
            f"and copy its {folder} folder into that cache, or give a local dataset directory "
            "in 'data'") from None
    except GatedRepoError:
        raise DataError(f"dataset '{repo_id}' is gated: accept its terms at "
                        f"https://huggingface.co/datasets/{repo_id} and log in with "
                        "`hf auth login`") from None
    except RepositoryNotFoundError:
        raise DataError(f"dataset '{repo_id}' was not found on the Hugging Face Hub (check the "
                        "spelling; a private dataset needs `hf auth login`)") from None
    except (HfHubHTTPError, OSError) as e:
        first = first_line(e)
        raise DataError(f"could not fetch dataset '{repo_id}': {first}") from None
    return Path(folder)


def _load(name: str, streaming: bool) -> tuple[Path, dict]:
    """(the folder read, {split name: Dataset or IterableDataset}) of a dataset id or
    directory."""
    datasets = _datasets()
    datasets.disable_progress_bars()  # the run log says what is read; no bars in it
    local = Path(name).expanduser()
    folder = local if local.is_dir() else _snapshot(name)
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            loaded = datasets.load_from_disk(str(folder))  # save_to_disk output: arrow
        else:
            loaded = datasets.load_dataset(str(folder), streaming=streaming)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one line for the user
        first = first_line(e)
        raise DataError(f"dataset {name}: cannot be read by the datasets library "
                        f"({type(e).__name__}: {first})") from None
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        return folder, {"train": loaded}  # a single saved split
    return folder, dict(loaded)


def _has_data_files(folder: Path) -> bool:
    return any(p.is_file() and p.name.endswith(_DATA_SUFFIXES) for p in folder.rglob("*"))


def is_dataset(data: str) -> bool:
    """True when ``data`` is for the datasets library rather than a JSONL directory."""
    local = Path(data).expanduser()
    if local.is_dir():
        # Any of our JSONL names makes it a JSONL directory (a missing train.jsonl is then
        # reported as such, not as a dataset without a train split).
        ours = ("train.jsonl", "test.jsonl") + VALID_NAMES
        return not any((local / n).is_file() for n in ours) and _has_data_files(local)
    return not local.exists() and bool(_REPO_ID.match(data))


def find_data(spec: Any) -> DataFiles:
    """The train, validation and test data of ``spec.data``: JSONL files or dataset splits."""
    if not spec.data:
        raise DataError("'data' is not set: give --data DIR (a directory with train.jsonl) "
                        "or a Hugging Face dataset id")
    named_split = isinstance(spec.val_split, str)
    if not is_dataset(spec.data):
        if spec.data_fields or spec.data_split != "train" or named_split:
            key = "data_fields" if spec.data_fields else "val_split" if named_split \
                else "data_split"
            files = find_files(spec.data)  # a missing directory is the first thing to report
            raise DataError(f"'{key}' applies to Hugging Face datasets, but {files.directory} "
                            "is a directory of JSONL files" + (
                                " (val_split: give a fraction, e.g. 0.1)" if named_split else ""))
        return find_files(spec.data)
    source = DatasetSource(spec.data, spec.data_fields or {}, spec.streaming)
    names = list(source.splits())

    def split(name: str, key: str) -> HFSplit:
        if name not in names:
            raise DataError(f"{key}: dataset {spec.data} has no split '{name}' (splits: "
                            f"{', '.join(names)})")
        return HFSplit(spec.data, name, source)

    train = split(spec.data_split, "data_split")
    if named_split:
        valid: Optional[HFSplit] = split(spec.val_split, "val_split")
    elif spec.val_split:
        valid = None  # a fraction of train, held out by load_data
    else:
        valid = next((HFSplit(spec.data, n, source) for n in VALID_SPLITS
                      if n in names and n != spec.data_split), None)
    test = next((HFSplit(spec.data, n, source) for n in TEST_SPLITS
                 if n in names and n != spec.data_split), None)
    local = Path(spec.data).expanduser()
    return DataFiles(local if local.is_dir() else Path.cwd(), train, valid, test)


def describe(files: DataFiles, log: Callable[[str], None]) -> None:
    if isinstance(files.train, HFSplit):
        other = ", ".join(f"{what}: split '{s.split}'" for what, s in
                          (("validation", files.valid), ("test", files.test)) if s is not None)
        log(f"data: Hugging Face dataset {files.train.name}, training on split "
            f"'{files.train.split}'" + (f" ({other})" if other else ""))
