"""Configuration mistakes that only the loaded model reveals are one-line exit-2 errors
naming the key, with no crash log (they used to end in a traceback and exit 1)."""

from __future__ import annotations

import json

import pytest

from mlx_tune.cli import main
from mlx_tune.exit_codes import EXIT_USAGE


@pytest.mark.parametrize("flags, says", [
    (["--fine-tune-type", "full", "--quantize", "4"],
     "fine_tune_type: full cannot train a quantized base"),
    (["--lora-layers", "99"], "lora.layers is 99 but the model has {blocks} blocks"),
], ids=["full-quantized", "lora-layers"])
def test_a_late_configuration_error_is_one_line_exit_2(flags, says, tiny_model, recipe_slice,
                                                       tmp_path, monkeypatch, capsys):
    blocks = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    monkeypatch.chdir(tmp_path)
    data = recipe_slice(tmp_path / "data")
    code = main(["train", "--model", str(tiny_model), "--data", str(data), "--backend", "mlx",
                 "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                 "--dashboard", "plain", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE
    assert err[-1].startswith("mlx-tune: error: " + says.format(blocks=blocks)), err
    assert not (tmp_path / "mlx-tune-crash.log").exists()
    assert not (tmp_path / "run" / "checkpoints").exists() or \
        not any((tmp_path / "run" / "checkpoints").iterdir())
