"""Low-level, backend-agnostic pieces of the checkpoint format.

Holds the codec protocol and the numpy codec (each backend brings its own
codec: ``backends/<name>/codec.py``), the errors, durable file helpers
(fsync, sha256) and the validator of a checkpoint directory. The manager in
``manager.py`` composes them. A checkpoint directory is only ever
safetensors + JSON, so nothing here unpickles anything.

Layout of one checkpoint directory::

    step-0000250/
        arrays-00000.safetensors   # one shard per materialization group
        arrays-00001.safetensors
        arrays-00002-0000.safetensors   # per-array fallback files, if any
        state.json                 # the caller's meta, verbatim
        manifest.json              # written LAST: files, sizes, sha256, arrays
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mlx_tune.errors import UserError
from mlx_tune.files import atomic_write

MANIFEST_NAME = "manifest.json"
STATE_NAME = "state.json"
FORMAT_NAME = "mlx-tune-checkpoint"
FORMAT_VERSION = 1

# safetensors dtype tag -> bytes per element, used to cross-check headers.
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
# A header bigger than this is garbage, not a real tensor index.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_HASH_CHUNK = 8 * 1024 * 1024


class CheckpointError(UserError):
    """Base class for checkpoint problems."""


class CheckpointSaveError(CheckpointError):
    """A save failed; nothing that looks complete was left behind."""

    def __init__(self, message: str, failed_arrays: list[str] | None = None):
        super().__init__(message)
        self.failed_arrays = list(failed_arrays or [])


class CheckpointCorrupt(CheckpointError):
    """A checkpoint directory failed validation. ``reason`` is one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------- codecs


@runtime_checkable
class ArrayCodec(Protocol):
    """The only thing the manager knows about a backend's arrays."""

    name: str

    def is_array(self, value: object) -> bool: ...
    def materialize(self, arrays: list) -> None: ...
    def save_file(self, arrays: dict[str, object], path: str) -> None: ...
    def load_file(self, path: str) -> dict[str, object]: ...
    def release(self) -> None: ...


class NumpyCodec:
    """numpy arrays via safetensors.numpy (no bfloat16: numpy has none)."""

    name = "numpy"

    def is_array(self, value: object) -> bool:
        import numpy as np

        return isinstance(value, (np.ndarray, np.generic))

    def materialize(self, arrays: list) -> None:
        pass  # numpy is always materialized

    def save_file(self, arrays: dict[str, object], path: str) -> None:
        import numpy as np
        from safetensors.numpy import save

        # Serialize in memory, then write with plain Python I/O so a full disk
        # surfaces as OSError(ENOSPC) instead of a wrapped Rust error.
        # asarray(order="C"), not ascontiguousarray, which turns 0-d into 1-d.
        data = save({k: np.asarray(v, order="C") for k, v in arrays.items()})
        with open(path, "wb") as f:
            f.write(data)

    def load_file(self, path: str) -> dict[str, object]:
        from safetensors.numpy import load

        # Read the bytes ourselves: the result owns its memory, nothing is
        # mmapped from a file that may later be deleted or replaced.
        with open(path, "rb") as f:
            return load(f.read())

    def release(self) -> None:
        pass


# ------------------------------------------------------------- file helpers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically and durably. Raises TypeError/ValueError if not JSON-able."""
    atomic_write(path, json.dumps(obj, indent=2))


def is_environment_error(exc: BaseException) -> bool:
    """True when retrying array by array cannot help (disk full, no permission).

    Backends wrap I/O errors differently (Rust/C++ exceptions carry only text),
    so the message is checked as well as errno.
    """
    fatal = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
    if isinstance(exc, OSError) and exc.errno in fatal:
        return True
    text = str(exc).lower()
    return any(s in text for s in ("no space left", "disk quota", "read-only file system",
                                   "permission denied", "storagefull"))


def describe_error(exc: BaseException) -> str:
    """One line: 'disk full (...)' style text for log lines and exceptions."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        prefix = "disk full: "
    elif isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        prefix = "permission denied: "
    else:
        prefix = ""
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{prefix}{type(exc).__name__}: {text}"

# ------------------------------------------------------------ save planning


def nbytes_of(value: object) -> int:
    """Byte size without materializing (mlx, numpy and torch all have .nbytes)."""
    try:
        return int(getattr(value, "nbytes", 0))
    except (TypeError, ValueError):
        return 0


def plan_groups(arrays: dict, group_bytes: int, max_arrays: int) -> list[list[str]]:
    """Split array names, in order, into groups of at most ``group_bytes``/``max_arrays``.

    Each group is materialized with one call and written as one shard, which
    bounds peak memory on a lazy backend.
    """
    groups: list[list[str]] = []
    cur: list[str] = []
    cur_bytes = 0
    for name, value in arrays.items():
        size = nbytes_of(value)
        if cur and (cur_bytes + size > group_bytes or len(cur) >= max_arrays):
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += size
    if cur:
        groups.append(cur)
    return groups


def pid_alive(pid: int) -> bool:
    """Whether another live process may still be writing a temp dir tagged ``pid``."""
    if pid == os.getpid():
        return False  # our own leftovers (a reused pid after a reboot) are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OverflowError, ValueError):
        return False
    return True


# ------------------------------------------------------- safetensors headers


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and sanity-check a safetensors header without loading tensors.

    Returns {name: {"dtype": str, "shape": list[int]}}. Raises ValueError with a
    short reason when the file is not a well-formed safetensors file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"header length {n} exceeds the file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    data_len = size - 8 - n
    out: dict[str, dict] = {}
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"malformed entry for {name!r}") from None
        if not 0 <= begin <= end <= data_len:
            raise ValueError(f"{name!r} data lies outside the file")
        if dtype in _DTYPE_SIZES and end - begin != math.prod(shape) * _DTYPE_SIZES[dtype]:
            raise ValueError(f"{name!r} byte length does not match {dtype}{shape}")
        end_max = max(end_max, end)
        out[name] = {"dtype": dtype, "shape": shape}
    if end_max != data_len:
        raise ValueError("trailing or missing tensor bytes")
    return out


# ---------------------------------------------------------------- validation


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointCorrupt(f"missing {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointCorrupt(f"{what} is not valid JSON") from None


def _safe_name(name: object) -> bool:
    # Manifests name files inside their own directory only; never follow paths,
    # and only ever accept safetensors or JSON (nothing that could be unpickled).
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and name.endswith((".safetensors", ".json")))


def validate_dir(path: Path, *, deep: bool = True, expected_step: int | None = None) -> dict:
    """Check a checkpoint directory; return its manifest or raise CheckpointCorrupt.

    ``deep=False`` skips hashing (sizes and headers only), for cheap checks.
    """
    if not path.is_dir():
        raise CheckpointCorrupt("not a directory")
    manifest = read_json(path / MANIFEST_NAME, MANIFEST_NAME)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointCorrupt(f"{MANIFEST_NAME} is not an mlx-tune checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointCorrupt(
            f"unsupported manifest format version {manifest.get('format_version')!r} "
            f"(this mlx-tune reads {FORMAT_VERSION})")
    step, files = manifest.get("step"), manifest.get("files")
    if not isinstance(step, int) or not isinstance(files, list):
        raise CheckpointCorrupt(f"{MANIFEST_NAME} lacks step or files")
    if expected_step is not None and step != expected_step:
        raise CheckpointCorrupt(f"manifest step {step} does not match the directory name")
    for entry in files:
        if not isinstance(entry, dict) or not _safe_name(entry.get("name")):
            raise CheckpointCorrupt(f"{MANIFEST_NAME} has a malformed file entry")
    names = [e["name"] for e in files]
    if STATE_NAME not in names:
        raise CheckpointCorrupt(f"{MANIFEST_NAME} does not list {STATE_NAME}")
    # Cheap checks on every file first, so a truncation is reported as such.
    for entry in files:
        f = path / entry["name"]
        if not f.is_file():
            raise CheckpointCorrupt(f"missing {entry['name']}")
        actual = f.stat().st_size
        if actual != entry.get("size"):
            raise CheckpointCorrupt(
                f"size mismatch in {entry['name']} (expected {entry.get('size')} bytes, found {actual})")
    if deep:
        for entry in files:
            if sha256_file(path / entry["name"]) != entry.get("sha256"):
                raise CheckpointCorrupt(f"sha256 mismatch in {entry['name']}")
    read_json(path / STATE_NAME, STATE_NAME)
    for entry in files:
        if not entry["name"].endswith(".safetensors"):
            continue
        try:
            header = read_safetensors_header(path / entry["name"])
        except (OSError, ValueError) as e:
            raise CheckpointCorrupt(f"{entry['name']}: bad safetensors header ({e})") from None
        if header != entry.get("arrays"):
            raise CheckpointCorrupt(f"{entry['name']}: tensors differ from the manifest")
    return manifest
