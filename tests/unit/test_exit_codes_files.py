"""The exit-code table against the README (the documented interface), and atomic_write."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlx_tune import exit_codes, files

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_exit_code_is_distinct_and_documented():
    codes = {name: v for name, v in vars(exit_codes).items() if name.startswith("EXIT_")}
    assert len(set(codes.values())) == len(codes)
    text = README.read_text()
    table = text[text.index("| rule | settings | exit code |"):text.index("Other exit codes")]
    documented = {int(m) for m in re.findall(r"\| (\d+) \|\n", table)}
    sentence = text[text.index("Other exit codes"):].split("\n\n")[0]
    documented |= {int(m) for m in re.findall(r"(?<![\w.])(\d+) [a-z]", sentence)}
    assert documented == set(codes.values())
    assert sorted(exit_codes.STOP_RULE_EXIT_CODES.values()) == sorted(
        int(m) for m in re.findall(r"\| (\d+) \|\n", table))


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "spec.yaml"
    target.write_text("old")
    files.atomic_write(target, "néw")
    assert target.read_bytes() == "néw".encode("utf-8")
    files.atomic_write(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.jsonl"
    target.write_text("complete\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "full_fsync", disk_full)
    with pytest.raises(OSError):
        files.atomic_write(target, "half")
    assert target.read_text() == "complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_atomic_file_replaces_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "adapters.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), files.atomic_file(target) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    with files.atomic_file(target) as fh:
        fh.write(b"new")
        assert target.read_bytes() == b"old"  # not visible before the block ends
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]
