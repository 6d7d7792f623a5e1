"""`convert-adapter` both ways: the converted adapter, loaded by the *other* library's
own loader (mlx-lm's load_adapters, peft's PeftModel.from_pretrained), gives the same
logits as the original in its own library. LoRA and DoRA, a subset of blocks, rank and
alpha that make the scale differ from 1."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from mlx_tune.cli import main  # noqa: E402

pytestmark = pytest.mark.torch
TEXT = "Preheat the oven and whisk the eggs with sugar."


def mlx_logits(tiny_model, adapter_dir) -> np.ndarray:
    from mlx_lm.utils import load
    model, tokenizer = load(str(tiny_model), adapter_path=str(adapter_dir))
    model.eval()
    return np.array(model(mx.array([tokenizer.encode(TEXT)])), dtype=np.float32)


def peft_logits(tiny_model, adapter_dir) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = AutoTokenizer.from_pretrained(str(tiny_model)).encode(TEXT)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


def base_logits(tiny_model) -> np.ndarray:
    from mlx_lm.utils import load
    model, tokenizer = load(str(tiny_model))
    return np.array(model(mx.array([tokenizer.encode(TEXT)])), dtype=np.float32)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_adapter_converts_to_peft(tiny_model, tmp_path, kind):
    from mlx.utils import tree_flatten
    from mlx_tune.backends.mlx.backend import MLXBackend
    from mlx_tune.config.spec import build_spec

    # Our MLX backend's own adapter: last 2 of 4 blocks, rank 4, alpha 6 -> scale 1.5.
    spec = build_spec(overrides={"model": str(tiny_model), "fine_tune_type": kind,
                                 "lora.rank": 4, "lora.alpha": 6.0, "lora.layers": 2,
                                 "lora.targets": ["q", "v", "down"], "lora.dropout": 0.0})
    backend = MLXBackend()
    backend.load(spec, tiny_model)
    mx.random.seed(3)
    randomized = [(k, v + 0.05 * mx.random.normal(v.shape)) for k, v in
                  tree_flatten(backend.model.trainable_parameters())]
    backend.model.load_weights(randomized, strict=False)
    backend.save_adapter(tmp_path / "mlx")

    assert main(["convert-adapter", "--to", "peft", str(tmp_path / "mlx"), str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == pytest.approx(6.0)
    assert config["layers_to_transform"] == [2, 3] and config["use_dora"] == (kind == "dora")

    ours = mlx_logits(tiny_model, tmp_path / "mlx")
    theirs = peft_logits(tiny_model, tmp_path / "peft")
    assert np.abs(ours - base_logits(tiny_model)).max() > 1e-2  # the adapter does something
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_adapter_converts_to_mlx(tiny_model, tmp_path, kind):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # A peft adapter on block 1 only (not a suffix: mlx-lm's num_layers must cover 1..3).
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(
        r=4, lora_alpha=10, target_modules=["self_attn.k_proj", "mlp.up_proj"],
        layers_to_transform=[1], use_dora=kind == "dora", lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(tmp_path / "peft"))

    assert main(["convert-adapter", "--to", "mlx", str(tmp_path / "peft"), str(tmp_path / "mlx")]) == 0
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["num_layers"] == 3 and config["fine_tune_type"] == kind
    assert config["lora_parameters"]["scale"] == pytest.approx(10 / 4)

    theirs = mlx_logits(tiny_model, tmp_path / "mlx")
    ours = peft_logits(tiny_model, tmp_path / "peft")
    assert np.abs(ours - base_logits(tiny_model)).max() > 1e-2
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)
