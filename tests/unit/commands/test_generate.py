"""`mlx-tune generate --tools FILE.json`: a tools file that cannot be read is a one-line
error. The prompts that reach the model are checked in tests/model/test_generate_tools.py."""

from __future__ import annotations

import json

import pytest

from mlx_tune.cli import main


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable JSON file"),
    (json.dumps({"name": "f"}), "must be a list of function specs"),
    (json.dumps([{"type": "function", "function": {"description": "no name"}}]), "tools[0]")])
def test_tools_file_errors_are_one_line(tmp_path, content, message, capsys):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["generate", "--model", "nowhere", "--tools", str(path), "--prompt", "x"]) != 0
    err = capsys.readouterr().err.strip()
    assert f"--tools {path}" in err and message in err and "\n" not in err, err
    assert main(["generate", "--model", "nowhere", "--tools", str(tmp_path / "none.json"),
                 "--prompt", "x"]) != 0
    assert "none.json" in capsys.readouterr().err
