"""Crash-safe, verifiable checkpoints: a crash costs at most the steps since the last save.

``CheckpointManager`` stores a flat ``dict[str, array]`` plus JSON-able meta under
``<output_dir>/checkpoints/step-NNNNNNN/``. It knows nothing about MLX or torch
beyond the small ``ArrayCodec`` hook the backend hands it.

Guarantees:
- a save goes to ``.tmp-step-NNNNNNN-<pid>/``, every file is fsynced, the manifest
  (sizes + sha256 of every file) is written last, then one rename publishes it;
  a killed or failed save leaves only a temp dir, which startup removes;
- loading validates sizes, hashes and safetensors headers first, and
  ``latest_valid`` falls back to the newest checkpoint that passes;
- files are never rewritten in place (re-saving a step builds a new directory and
  swaps it in), so hardlinks (``best/``) and loaded arrays never see a change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from mlx_tune.files import fsync_dir, fsync_file
from mlx_tune.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    STATE_NAME,
    ArrayCodec,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointSaveError,
    NumpyCodec,
    describe_error,
    is_environment_error,
    nbytes_of,
    pid_alive,
    plan_groups,
    read_json,
    read_safetensors_header,
    sha256_file,
    validate_dir,
    write_json,
)

__all__ = [
    "ArrayCodec", "NumpyCodec", "CheckpointManager", "Loaded",
    "CheckpointError", "CheckpointSaveError", "CheckpointCorrupt",
]

Log = Callable[[str], None]
_STEP_RE = re.compile(r"^step-(\d+)$")
_PID_RE = re.compile(r"-(\d+)$")
BEST_NAME = "best"


@dataclass
class Loaded:
    """A validated checkpoint, with its arrays fully materialized in memory."""

    path: Path
    step: int
    arrays: dict[str, object]
    meta: dict
    manifest: dict = field(repr=False, default_factory=dict)


class CheckpointManager:
    """Saves, validates, discovers, loads and prunes checkpoints under ``root``."""

    def __init__(self, root: str | os.PathLike, codec: ArrayCodec, *, keep: int = 3,
                 group_bytes: int = 256 * 1024 * 1024, group_max_arrays: int = 1024,
                 log: Log = print) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = Path(root)
        self.codec = codec
        self.keep = keep
        self.group_bytes = group_bytes
        self.group_max_arrays = group_max_arrays
        self.log = log
        self.cleanup_stale()

    # ------------------------------------------------------------- startup

    def cleanup_stale(self) -> None:
        """Remove temp dirs of killed saves; undo a swap interrupted halfway."""
        if not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if not p.name.startswith((".tmp-", ".old-")) or not p.is_dir():
                continue
            m = _PID_RE.search(p.name)
            if m and pid_alive(int(m.group(1))):
                self.log(f"leaving {p}: process {m.group(1)} that wrote it is still running")
                continue
            if p.name.startswith(".old-") and m:
                # ".old-<target>-<pid>" is the previous copy moved aside during a swap;
                # if the kill came before the new copy was renamed in, it is the only one.
                target = self.root / p.name[len(".old-"):m.start()]
                if not target.exists():
                    try:
                        os.rename(p, target)
                        fsync_dir(self.root)
                        self.log(f"restored {target} from an interrupted replace")
                    except OSError as e:
                        self.log(f"could not restore {target} from {p}: {describe_error(e)}")
                    continue
            shutil.rmtree(p, ignore_errors=True)
            self.log(f"removed stale temporary checkpoint dir {p}")

    # ---------------------------------------------------------------- save

    def save(self, step: int, arrays: dict, meta: dict, *, best: bool = False) -> Path:
        """Write checkpoint ``step`` atomically; return its final path.

        Raises CheckpointSaveError (one-line message) and leaves earlier
        checkpoints untouched on any failure.
        """
        try:
            path = self._save(step, arrays, meta)
        finally:
            self.codec.release()
        if best:
            try:
                self.mark_best(path)
            except CheckpointError as e:
                # The step checkpoint is safe; best/ keeps its previous verified copy.
                self.log(f"saved {path} but could not update {BEST_NAME}/: {e}")
        try:
            self._prune(protect=path)
        except Exception as e:  # pruning is housekeeping; the new checkpoint is safe
            self.log(f"could not prune old checkpoints: {describe_error(e)}")
        return path

    def _save(self, step: int, arrays: dict, meta: dict) -> Path:
        if not isinstance(step, int) or step < 0:
            raise CheckpointSaveError(f"invalid checkpoint step {step!r}")
        if not isinstance(meta, dict):
            raise CheckpointSaveError("checkpoint meta must be a dict")
        kept = {k: v for k, v in arrays.items() if self.codec.is_array(v)}
        dropped = [k for k in arrays if k not in kept]
        if dropped:
            self.log(f"checkpoint step {step}: not saving {len(dropped)} non-array "
                     f"value(s): {', '.join(map(str, dropped))}")
        bad_keys = [k for k in kept if not isinstance(k, str)]
        if bad_keys:
            raise CheckpointSaveError(f"array names must be strings: {bad_keys!r}")
        try:
            json.dumps(meta)  # fail before writing any arrays
        except (TypeError, ValueError) as e:
            raise CheckpointSaveError(
                f"checkpoint step {step} not saved: meta is not JSON-serializable ({e})") from None

        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._check_free_space(kept)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            files = self._write_arrays(tmp, step, kept)
            write_json(tmp / STATE_NAME, meta)
            files.append(self._file_entry(tmp / STATE_NAME, None))
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "step": step,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "codec": self.codec.name,
                "files": files,
            }
            write_json(tmp / MANIFEST_NAME, manifest)  # last: its presence means complete
            fsync_dir(tmp)
            self._publish(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, CheckpointSaveError):
                raise
            if not isinstance(e, Exception):
                raise  # Ctrl-C / SystemExit: cleaned up, now let it through
            raise CheckpointSaveError(
                f"checkpoint step {step} not saved: {describe_error(e)}") from e
        return final

    def _check_free_space(self, arrays: dict) -> None:
        # Fail before writing gigabytes into a disk that cannot hold them.
        need = sum(nbytes_of(v) for v in arrays.values())
        free = shutil.disk_usage(self.root).free
        if need > free:
            raise CheckpointSaveError(
                f"disk full: checkpoint needs ~{need / 1e6:.1f} MB, "
                f"{free / 1e6:.1f} MB free in {self.root}")

    def _write_arrays(self, tmp: Path, step: int, arrays: dict) -> list[dict]:
        files: list[dict] = []
        failed: list[str] = []
        reasons: list[str] = []
        for gi, names in enumerate(plan_groups(arrays, self.group_bytes, self.group_max_arrays)):
            group = {n: arrays[n] for n in names}
            # Materialize one group at a time: bounded peak memory, and a save
            # never hands an unevaluated graph to the writer.
            self.codec.materialize(list(group.values()))
            shard = tmp / f"arrays-{gi:05d}.safetensors"
            try:
                files.append(self._write_one(shard, group))
                continue
            except Exception as e:
                shard.unlink(missing_ok=True)
                if is_environment_error(e):
                    raise  # disk full / permissions: per-array retries cannot help
                self.log(f"checkpoint step {step}: writing {shard.name} failed "
                         f"({describe_error(e)}); retrying array by array")
            for ai, name in enumerate(names):
                part = tmp / f"arrays-{gi:05d}-{ai:04d}.safetensors"
                try:
                    files.append(self._write_one(part, {name: group[name]}))
                except Exception as e:
                    part.unlink(missing_ok=True)
                    if is_environment_error(e):
                        raise
                    failed.append(name)
                    reasons.append(f"{name} ({describe_error(e)})")
        if failed:
            raise CheckpointSaveError(
                f"checkpoint step {step} not saved: {len(failed)} array(s) failed to write: "
                + "; ".join(reasons), failed_arrays=failed)
        return files

    def _write_one(self, path: Path, group: dict) -> dict:
        self.codec.save_file(group, str(path))
        return self._file_entry(path, group)

    def _file_entry(self, path: Path, group: dict | None) -> dict:
        fsync_file(path)
        entry = {"name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}
        if group is not None:
            # Record what actually landed on disk, and catch a codec that
            # silently dropped or renamed an array.
            header = read_safetensors_header(path)
            if set(header) != set(group):
                missing = sorted(set(group) - set(header))
                raise ValueError(f"{path.name} is missing arrays after writing: {missing}")
            entry["arrays"] = header
        return entry

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first."""
        aside = None
        if final.exists():
            aside = self.root / f".old-{final.name}-{os.getpid()}"
            if aside.exists():
                shutil.rmtree(aside)
            os.rename(final, aside)
        os.rename(tmp, final)
        fsync_dir(self.root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    # ------------------------------------------------------- validate/load

    def validate(self, path: str | os.PathLike) -> None:
        """Raise CheckpointCorrupt (one-line reason) unless ``path`` is complete and intact."""
        self._validate(Path(path))

    def _validate(self, path: Path, deep: bool = True) -> dict:
        m = _STEP_RE.match(path.name)
        try:
            return validate_dir(path, deep=deep, expected_step=int(m.group(1)) if m else None)
        except OSError as e:  # unreadable counts as unusable, not as a crash
            raise CheckpointCorrupt(f"cannot read: {describe_error(e)}") from None

    def discover(self) -> list[tuple[Path, int]]:
        """Published step checkpoints, newest first (not validated)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                found.append((p, int(m.group(1))))
        return sorted(found, key=lambda t: t[1], reverse=True)

    def latest_valid(self, log: Log | None = None, *,
                     check: Callable[[Loaded], None] | None = None,
                     below: int | None = None) -> Loaded | None:
        """Load the newest checkpoint that validates; log why each newer one was skipped.

        ``check`` validates what the files hold (the state's schema) and raises
        CheckpointCorrupt to reject it: files that verify but hold the wrong state are
        skipped like a bad checksum. ``below``: only checkpoints older than this step."""
        log = log or self.log
        for path, step in self.discover():
            if below is not None and step >= below:
                continue
            try:
                loaded = self._load_checked(path)
                if check is not None:
                    check(loaded)
                return loaded
            except CheckpointCorrupt as e:
                log(f"skipping {self._display(path)}: {e.reason}")
        return None

    def load(self, path: str | os.PathLike) -> tuple[dict, dict]:
        """Validate, then return ``(arrays, meta)`` fully materialized."""
        loaded = self._load_checked(Path(path))
        return loaded.arrays, loaded.meta

    def _load_checked(self, path: Path) -> Loaded:
        manifest = self._validate(path)
        meta = read_json(path / STATE_NAME, STATE_NAME)
        if not isinstance(meta, dict):
            raise CheckpointCorrupt(f"{STATE_NAME} is not a JSON object")
        arrays: dict[str, object] = {}
        try:
            for entry in manifest["files"]:
                if entry["name"].endswith(".safetensors"):
                    arrays.update(self.codec.load_file(str(path / entry["name"])))
        except Exception as e:  # a codec that cannot read the file: treat as corrupt
            raise CheckpointCorrupt(f"cannot load arrays: {describe_error(e)}") from None
        return Loaded(path=path, step=manifest["step"], arrays=arrays, meta=meta,
                      manifest=manifest)

    def _display(self, path: Path) -> str:
        # "checkpoints/step-0000500" reads better in a log than an absolute path.
        return f"{self.root.name}/{path.name}"

    # ----------------------------------------------------- best/retention

    @property
    def best_path(self) -> Path:
        return self.root / BEST_NAME

    def best_step(self) -> int | None:
        """Step that ``best/`` was copied from, or None when there is no usable best/."""
        try:
            return int(read_json(self.best_path / MANIFEST_NAME, MANIFEST_NAME)["step"])
        except (CheckpointCorrupt, KeyError, TypeError, ValueError):
            return None

    def mark_best(self, path: str | os.PathLike) -> Path:
        """Make ``best/`` a verified copy of checkpoint ``path`` (hardlinks, atomic swap)."""
        src = Path(path)
        manifest = self._validate(src, deep=False)
        tmp = self.root / f".tmp-{BEST_NAME}-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            for name in [e["name"] for e in manifest["files"]] + [MANIFEST_NAME]:
                try:
                    # Files are immutable once published, so sharing inodes is safe
                    # and costs no disk space.
                    os.link(src / name, tmp / name)
                except OSError:
                    shutil.copyfile(src / name, tmp / name)
                    fsync_file(tmp / name)
            fsync_dir(tmp)
            validate_dir(tmp, deep=True)
            self._publish(tmp, self.best_path)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, CheckpointError) or not isinstance(e, Exception):
                raise
            raise CheckpointSaveError(f"could not update {BEST_NAME}/: {describe_error(e)}") from e
        self.log(f"{BEST_NAME}/ now holds step {manifest['step']}")
        return self.best_path

    def _prune(self, protect: Path) -> None:
        """Keep the newest ``keep`` step checkpoints (and always ``protect``)."""
        best = self.best_step()
        for path, step in self.discover()[self.keep:]:
            if path == protect:
                continue
            if step == best:
                try:
                    validate_dir(self.best_path, deep=False)
                except CheckpointCorrupt as e:
                    self.log(f"keeping {self._display(path)}: {BEST_NAME}/ copy is unusable ({e.reason})")
                    continue
            self._remove(path)

    def _remove(self, path: Path) -> None:
        # Rename first so a kill mid-delete leaves a temp dir (cleaned at startup),
        # never a half-deleted directory that still looks like a checkpoint.
        doomed = self.root / f".tmp-del-{path.name}-{time.monotonic_ns()}-{os.getpid()}"
        try:
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        except OSError as e:
            self.log(f"could not remove old checkpoint {self._display(path)}: {describe_error(e)}")
