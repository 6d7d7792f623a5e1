"""`convert-adapter` refuses a folder without an adapter, or with an unreadable
adapter_config.json, in one line. Conversions checked against each library's own loader:
tests/model/test_convert_adapter.py."""

from __future__ import annotations

import mlx.core as mx

from mlx_tune.cli import main


def test_bad_adapters_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["convert-adapter", "--to", "peft", str(tmp_path / "empty"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "adapters.safetensors" in err and "Traceback" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    mx.save_safetensors(str(bad / "adapters.safetensors"), {"x.lora_a": mx.zeros((2, 2))})
    (bad / "adapter_config.json").write_text("{\n  \"fine_tune_type\": \"lora\",\n  oops }")
    assert main(["convert-adapter", "--to", "peft", str(bad), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "adapter_config.json:3: not valid JSON" in err and len(err.strip().splitlines()) == 1
