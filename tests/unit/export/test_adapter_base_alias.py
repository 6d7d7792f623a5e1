"""convert-adapter resolves mlx-tune's own model aliases: a peft adapter trained from the
embedded ``tiny-mistral`` converts to mlx-lm without --base (it used to fail with "cannot
tell how many blocks the base 'tiny-mistral' has")."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_tune.cli import main
from mlx_tune.models.hub import PACKAGE_DIR, load_aliases


def test_a_peft_adapter_of_the_embedded_base_converts_to_mlx(tmp_path, capsys):
    pytest.importorskip("mlx.core")
    embedded = PACKAGE_DIR / load_aliases()["tiny-mistral"]["path"]
    config = json.loads((embedded / "config.json").read_text())
    blocks, hidden = config["num_hidden_layers"], config["hidden_size"]
    src, r = tmp_path / "peft", 2
    src.mkdir()
    module = f"base_model.model.model.layers.{blocks - 1}.self_attn.q_proj"
    rng = np.random.default_rng(0)
    save_file({f"{module}.lora_A.weight": rng.standard_normal((r, hidden), np.float32),
               f"{module}.lora_B.weight": rng.standard_normal((hidden, r), np.float32)},
              str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": ["q_proj"],
        "layers_to_transform": [blocks - 1], "base_model_name_or_path": "tiny-mistral"}))

    assert main(["convert-adapter", "--to", "mlx", str(src), str(tmp_path / "mlx")]) == 0, \
        capsys.readouterr().err
    written = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert written["num_layers"] == 1  # the last block only, counted from the embedded base
    assert written["lora_parameters"]["keys"] == ["self_attn.q_proj"]
