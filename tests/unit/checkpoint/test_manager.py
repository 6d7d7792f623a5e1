"""CheckpointManager: round trips, fault injection, corruption, retention."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

import mlx_tune.checkpoint.manager as ckpt_mod
from mlx_tune.checkpoint.manager import (
    CheckpointCorrupt,
    CheckpointManager,
    CheckpointSaveError,
    NumpyCodec,
)

mx = pytest.importorskip("mlx.core")
from mlx_tune.backends.mlx.codec import MlxCodec  # noqa: E402 - needs mlx


class SpyCodec:
    """Wraps a real codec; records calls and injects failures."""

    def __init__(self, inner, *, fail_batched=False, fail_names=(), fail_exc=None,
                 fail_after_bytes=False):
        self.inner = inner
        self.name = inner.name
        self.fail_batched = fail_batched          # any write of >1 array raises
        self.fail_names = set(fail_names)         # any write containing these raises
        self.fail_exc = fail_exc                  # raise this on every write
        self.fail_after_bytes = fail_after_bytes  # write a partial file, then raise
        self.materialized: list[list] = []
        self.writes: list[list[str]] = []
        self.releases = 0

    def is_array(self, value):
        return self.inner.is_array(value)

    def materialize(self, arrays):
        self.materialized.append(list(arrays))
        self.inner.materialize(arrays)

    def save_file(self, arrays, path):
        self.writes.append(sorted(arrays))
        if self.fail_exc is not None:
            if self.fail_after_bytes:
                Path(path).write_bytes(b"partial")
            raise self.fail_exc
        if self.fail_batched and len(arrays) > 1:
            Path(path).write_bytes(b"half a shard")
            raise RuntimeError("simulated batched write failure")
        bad = self.fail_names & set(arrays)
        if bad:
            raise ValueError(f"cannot serialize {sorted(bad)}")
        self.inner.save_file(arrays, path)

    def load_file(self, path):
        return self.inner.load_file(path)

    def release(self):
        self.releases += 1
        self.inner.release()


def np_arrays(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "model.layers.0.lora_a": rng.standard_normal((4, 8)).astype(np.float32),
        "model.layers.0.lora_b": rng.standard_normal((8, 4)).astype(np.float32),
        "optimizer.step": np.array(seed, dtype=np.int32),
        "rng.key": np.array([seed, 12345], dtype=np.uint32),
        "empty": np.zeros((0, 3), dtype=np.int32),
    }


def mlx_arrays(seed: int = 0) -> dict:
    a = mx.random.normal((4, 8), key=mx.random.key(seed))
    return {
        "w_bf16": (a * 2).astype(mx.bfloat16),  # lazy: saved without an explicit eval
        "w_f32": a + 1,
        "count": mx.array([seed, 7], dtype=mx.int32),
        "rng.key": mx.random.key(seed),
    }


def as_np(value) -> np.ndarray:
    if isinstance(value, mx.array):
        if value.dtype == mx.bfloat16:
            value = value.astype(mx.float32)
        return np.array(value)
    return np.asarray(value)


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        x, y = as_np(a[k]), as_np(b[k])
        assert x.shape == y.shape and x.dtype == y.dtype, k
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def logs() -> list[str]:
    return []


def manager(tmp_path: Path, codec, logs: list[str], **kw) -> CheckpointManager:
    return CheckpointManager(tmp_path / "checkpoints", codec, log=logs.append, **kw)


def no_temp_dirs(root: Path) -> bool:
    return not [p for p in root.iterdir() if p.name.startswith(".")]


META = {"step": 3, "loss": 1.25, "fingerprint": {"model": "m", "lora.rank": 8},
        "data": {"epoch": 0, "order": [2, 0, 1]}, "nan": float("nan")}


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("codec_name", ["numpy", "mlx"])
def test_round_trip(tmp_path, logs, codec_name):
    codec = NumpyCodec() if codec_name == "numpy" else MlxCodec()
    arrays = np_arrays(3) if codec_name == "numpy" else mlx_arrays(3)
    m = manager(tmp_path, codec, logs)
    path = m.save(3, arrays, META)
    assert path == tmp_path / "checkpoints" / "step-0000003"
    m.validate(path)
    loaded_arrays, meta = m.load(path)
    assert_same(arrays, loaded_arrays)
    assert meta["fingerprint"] == META["fingerprint"] and meta["data"] == META["data"]
    assert np.isnan(meta["nan"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["format_version"] == 1
    assert manifest["codec"] == codec_name
    listed = {n: info for f in manifest["files"] for n, info in f.get("arrays", {}).items()}
    assert set(listed) == set(arrays)
    if codec_name == "mlx":
        assert listed["w_bf16"] == {"dtype": "BF16", "shape": [4, 8]}
        assert loaded_arrays["w_bf16"].dtype == mx.bfloat16
        assert listed["rng.key"]["dtype"] == "U32"
    else:
        assert listed["rng.key"] == {"dtype": "U32", "shape": [2]}
    assert no_temp_dirs(m.root)


def test_mlx_load_is_materialized_not_bound_to_file(tmp_path, logs):
    m = manager(tmp_path, MlxCodec(), logs)
    path = m.save(1, mlx_arrays(1), {})
    arrays, _ = m.load(path)
    for f in path.iterdir():  # the loaded arrays must not read from these files
        f.unlink()
    path.rmdir()
    assert float(mx.sum(arrays["w_f32"])) == pytest.approx(float(mx.sum(mlx_arrays(1)["w_f32"])))


def test_non_arrays_filtered_and_named_once(tmp_path, logs):
    m = manager(tmp_path, NumpyCodec(), logs)
    arrays = dict(np_arrays(), lr=1e-4, name="adapter", nested={"x": 1})
    path = m.save(1, arrays, {})
    loaded, _ = m.load(path)
    assert set(loaded) == set(np_arrays())
    lines = [line for line in logs if "non-array" in line]
    assert len(lines) == 1 and all(n in lines[0] for n in ("lr", "name", "nested"))


@pytest.mark.parametrize("inner", ["numpy", "mlx"])
def test_materialized_once_per_group_and_one_shard_per_group(tmp_path, logs, inner):
    codec = SpyCodec(NumpyCodec() if inner == "numpy" else MlxCodec())
    arrays = np_arrays() if inner == "numpy" else mlx_arrays()
    # 128-byte budget: the 4x8 float32 arrays (128 B) each get their own group.
    m = manager(tmp_path, codec, logs, group_bytes=128)
    path = m.save(1, arrays, {})
    groups = codec.materialized
    assert len(groups) > 1 and sum(len(g) for g in groups) == len(arrays)
    assert len(codec.writes) == len(groups)
    shards = sorted(p.name for p in path.glob("arrays-*.safetensors"))
    assert shards == [f"arrays-{i:05d}.safetensors" for i in range(len(groups))]
    assert codec.releases == 1
    assert_same(arrays, m.load(path)[0])


# ---------------------------------------------------------------- fault injection


@pytest.mark.parametrize("inner", ["numpy", "mlx"])
def test_batched_write_failure_falls_back_to_per_array(tmp_path, logs, inner):
    codec = SpyCodec(NumpyCodec() if inner == "numpy" else MlxCodec(), fail_batched=True)
    arrays = np_arrays() if inner == "numpy" else mlx_arrays()
    m = manager(tmp_path, codec, logs)
    path = m.save(2, arrays, {"k": 1})
    m.validate(path)
    assert_same(arrays, m.load(path)[0])
    assert len(list(path.glob("arrays-00000-*.safetensors"))) == len(arrays)
    assert not (path / "arrays-00000.safetensors").exists()
    assert any("retrying array by array" in line for line in logs)


def test_one_array_failing_aborts_naming_it(tmp_path, logs):
    m = manager(tmp_path, NumpyCodec(), logs)
    prev = m.save(1, np_arrays(1), {"s": 1})
    m.codec = SpyCodec(NumpyCodec(), fail_names={"rng.key"})
    with pytest.raises(CheckpointSaveError) as ei:
        m.save(2, np_arrays(2), {"s": 2})
    assert "rng.key" in str(ei.value) and ei.value.failed_arrays == ["rng.key"]
    assert "\n" not in str(ei.value)
    assert not (m.root / "step-0000002").exists() and no_temp_dirs(m.root)
    assert m.discover() == [(prev, 1)]
    m.validate(prev)


@pytest.mark.parametrize("inner", ["numpy", "mlx"])
def test_disk_full_during_shard_write(tmp_path, logs, inner):
    codec = NumpyCodec() if inner == "numpy" else MlxCodec()
    arrays = np_arrays if inner == "numpy" else mlx_arrays
    m = manager(tmp_path, codec, logs)
    prev = m.save(1, arrays(1), {})
    m.codec = SpyCodec(codec, fail_exc=OSError(errno.ENOSPC, "No space left on device"),
                       fail_after_bytes=True)
    with pytest.raises(CheckpointSaveError) as ei:
        m.save(2, arrays(2), {})
    assert "disk full" in str(ei.value) and "\n" not in str(ei.value)
    assert len(m.codec.writes) == 1  # no pointless per-array retries on a full disk
    assert no_temp_dirs(m.root) and m.discover() == [(prev, 1)]
    m.validate(prev)
    assert m.latest_valid().step == 1


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_os_error_writing_manifest_or_state(tmp_path, logs, monkeypatch, err):
    m = manager(tmp_path, NumpyCodec(), logs)
    prev = m.save(1, np_arrays(1), {})
    real = ckpt_mod.write_json

    def failing(path, obj):
        if Path(path).name == "manifest.json":
            Path(path).write_text('{"format": "mlx-tune-checkpoint"')  # torn write
            raise OSError(err, os.strerror(err))
        real(path, obj)

    monkeypatch.setattr(ckpt_mod, "write_json", failing)
    with pytest.raises(CheckpointSaveError) as ei:
        m.save(2, np_arrays(2), {})
    assert ("disk full" if err == errno.ENOSPC else "permission denied") in str(ei.value)
    assert no_temp_dirs(m.root) and [s for _, s in m.discover()] == [1]
    m.validate(prev)


def test_resave_same_step_replaces_it(tmp_path, logs):
    m = manager(tmp_path, NumpyCodec(), logs)
    m.save(5, np_arrays(1), {"v": 1})
    path = m.save(5, np_arrays(2), {"v": 2})
    arrays, meta = m.load(path)
    assert meta == {"v": 2}
    assert_same(arrays, np_arrays(2))
    assert no_temp_dirs(m.root)


def test_ctrl_c_during_save_cleans_up_and_propagates(tmp_path, logs):
    m = manager(tmp_path, SpyCodec(NumpyCodec(), fail_exc=KeyboardInterrupt()), logs)
    with pytest.raises(KeyboardInterrupt):
        m.save(1, np_arrays(), {})
    assert no_temp_dirs(m.root) and m.discover() == []


def test_meta_not_json_is_refused_before_writing(tmp_path, logs):
    m = manager(tmp_path, NumpyCodec(), logs)
    with pytest.raises(CheckpointSaveError, match="JSON"):
        m.save(1, np_arrays(), {"bad": object()})
    assert not m.root.exists() or no_temp_dirs(m.root)


# ---------------------------------------------------------------- corruption


def _truncate(p: Path):
    shard = p / "arrays-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])


def _flip(p: Path):
    shard = p / "arrays-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated shard": (_truncate, "size mismatch in arrays-00000.safetensors"),
    "flipped byte": (_flip, "sha256 mismatch in arrays-00000.safetensors"),
    "deleted manifest": (lambda p: (p / "manifest.json").unlink(), "missing manifest.json"),
    "garbage manifest": (lambda p: (p / "manifest.json").write_text("{not json"),
                         "manifest.json is not valid JSON"),
    "garbage state": (lambda p: (p / "state.json").write_text("\x00\x01garbage"),
                      "size mismatch in state.json"),
    "missing shard": (lambda p: (p / "arrays-00000.safetensors").unlink(),
                      "missing arrays-00000.safetensors"),
    "wrong version": (lambda p: _edit_manifest(p, format_version=99),
                      "unsupported manifest format version 99"),
}


def _edit_manifest(p: Path, **changes):
    m = json.loads((p / "manifest.json").read_text())
    m.update(changes)
    (p / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_newest_is_skipped_with_reason(tmp_path, logs, kind):
    corrupt, reason = CORRUPTIONS[kind]
    m = manager(tmp_path, NumpyCodec(), logs)
    m.save(1, np_arrays(1), {"s": 1})
    newest = m.save(2, np_arrays(2), {"s": 2})
    corrupt(newest)
    with pytest.raises(CheckpointCorrupt) as ei:
        m.validate(newest)
    assert ei.value.reason.startswith(reason) and "\n" not in ei.value.reason
    with pytest.raises(CheckpointCorrupt):
        m.load(newest)
    loaded = m.latest_valid()
    assert loaded.step == 1 and loaded.meta == {"s": 1}
    assert_same(loaded.arrays, np_arrays(1))
    assert [line for line in logs if line.startswith("skipping")] == \
        [f"skipping checkpoints/step-0000002: {ei.value.reason}"]


def test_garbage_state_json_with_matching_hash_is_rejected(tmp_path, logs):
    # A manifest that vouches for an unparseable state.json is still refused.
    m = manager(tmp_path, NumpyCodec(), logs)
    p = m.save(1, np_arrays(), {})
    (p / "state.json").write_text("{oops")
    _edit_manifest(p, files=[dict(f, size=5, sha256=ckpt_mod.sha256_file(p / "state.json"))
                             if f["name"] == "state.json" else f
                             for f in json.loads((p / "manifest.json").read_text())["files"]])
    with pytest.raises(CheckpointCorrupt, match="state.json is not valid JSON"):
        m.validate(p)


def test_manifest_cannot_point_outside_its_dir(tmp_path, logs):
    m = manager(tmp_path, NumpyCodec(), logs)
    p = m.save(1, np_arrays(), {})
    files = json.loads((p / "manifest.json").read_text())["files"]
    files[0]["name"] = "../../evil.pkl"
    _edit_manifest(p, files=files)
    with pytest.raises(CheckpointCorrupt, match="malformed file entry"):
        m.validate(p)


def test_all_corrupt_returns_none(tmp_path, logs):
    m = manager(tmp_path, NumpyCodec(), logs)
    for s in (1, 2):
        (m.save(s, np_arrays(s), {}) / "manifest.json").unlink()
    assert m.latest_valid() is None
    assert len([line for line in logs if line.startswith("skipping")]) == 2
    assert manager(tmp_path / "nowhere", NumpyCodec(), logs).latest_valid() is None


# ---------------------------------------------------------- retention and best


def test_retention_keeps_last_n_plus_best(tmp_path, logs):
    m = manager(tmp_path, NumpyCodec(), logs, keep=2)
    for s in range(1, 6):
        m.save(s, np_arrays(s), {"s": s}, best=(s == 2))
    assert [s for _, s in m.discover()] == [5, 4]
    assert m.best_step() == 2
    m.validate(m.best_path)  # still complete although step-0000002 was pruned
    arrays, meta = m.load(m.best_path)
    assert meta == {"s": 2}
    assert_same(arrays, np_arrays(2))
    assert no_temp_dirs(m.root)


def test_mark_best_swaps_atomically_and_hardlinks(tmp_path, logs):
    m = manager(tmp_path, NumpyCodec(), logs)
    p1 = m.save(1, np_arrays(1), {"s": 1}, best=True)
    p2 = m.save(2, np_arrays(2), {"s": 2})
    assert m.best_step() == 1
    m.mark_best(p2)
    assert m.best_step() == 2 and m.load(m.best_path)[1] == {"s": 2}
    shard = "arrays-00000.safetensors"
    assert os.stat(p2 / shard).st_ino == os.stat(m.best_path / shard).st_ino
    m.validate(p1)
    assert no_temp_dirs(m.root)


def test_mark_best_refuses_corrupt_source(tmp_path, logs):
    m = manager(tmp_path, NumpyCodec(), logs)
    m.save(1, np_arrays(1), {}, best=True)
    p2 = m.save(2, np_arrays(2), {})
    _flip(p2)
    with pytest.raises(CheckpointCorrupt):
        m.mark_best(p2)
    assert m.best_step() == 1
    m.validate(m.best_path)
    assert no_temp_dirs(m.root)


# ---------------------------------------------------------------- startup


def test_stale_temp_dirs_removed_on_startup(tmp_path, logs):
    m = manager(tmp_path, NumpyCodec(), logs)
    good = m.save(1, np_arrays(), {})
    dead_pid = 2 ** 22 + 12345  # above pid_max: certainly not running
    stale = [m.root / f".tmp-step-0000002-{dead_pid}", m.root / f".tmp-step-0000003-{os.getpid()}",
             m.root / f".tmp-best-{dead_pid}"]
    for d in stale:
        d.mkdir()
        (d / "arrays-00000.safetensors").write_bytes(b"half")
    logs.clear()
    m2 = manager(tmp_path, NumpyCodec(), logs)
    assert not any(d.exists() for d in stale)
    assert len([line for line in logs if "stale" in line]) == 3
    assert m2.discover() == [(good, 1)]


def test_interrupted_replace_is_undone_on_startup(tmp_path, logs):
    m = manager(tmp_path, NumpyCodec(), logs)
    p = m.save(1, np_arrays(), {"s": 1})
    # Killed after moving the old copy aside, before renaming the new one in.
    aside = m.root / f".old-step-0000001-{2 ** 22 + 1}"
    os.rename(p, aside)
    manager(tmp_path, NumpyCodec(), logs)
    assert not aside.exists()
    m.validate(p)
    assert any("restored" in line for line in logs)


def test_temp_dir_of_live_process_is_left_alone(tmp_path, logs):
    m = manager(tmp_path, NumpyCodec(), logs)
    m.save(1, np_arrays(), {})
    live = m.root / f".tmp-step-0000002-{os.getppid()}"
    live.mkdir()
    manager(tmp_path, NumpyCodec(), logs)
    assert live.exists()
