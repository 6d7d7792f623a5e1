"""`mlx-tune fuse`: a fused MLX run and a fused torch run give the logits of the base
plus the adapter (as each library loads it); step-N fuses the weights the trainer had at
step N; GGUF through mlx-lm's converter; refusals are one line."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_tune.cli import main
from mlx_tune.training.recipe import train

TEXT = "Preheat the oven and whisk the eggs with sugar."


# Checkpoints at steps 3 and 6; a LoRA scale (alpha / rank) other than 1.
FUSED_RUN = {"max_steps": 6, "eval_steps": 3, "checkpoint_interval": 3, "report_every": 3,
             "learning_rate": 2e-3, "lora": {"rank": 4, "alpha": 8.0}}


def trained(spec):
    assert train(spec, resume="fresh", log=lambda m: None).exit_code == 0
    return spec


def mlx_logits(model_dir, adapter=None) -> np.ndarray:
    from mlx_lm.utils import load
    model, tokenizer = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    model.eval()
    return np.array(model(mx.array([tokenizer.encode(TEXT)])), dtype=np.float32)


@pytest.fixture(scope="module")
def mlx_run(tiny_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuse") / "run"
    return trained(tiny_spec(FUSED_RUN, output_dir=out)), out


def test_fused_mlx_run_equals_base_plus_adapter(mlx_run, tiny_model, tmp_path):
    spec, out = mlx_run
    assert main(["fuse", str(out), "--output", str(tmp_path / "fused")]) == 0
    fused = tmp_path / "fused"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (fused / name).is_file(), name
    assert list(fused.glob("*.safetensors"))
    reference = mlx_logits(tiny_model, out / "adapters")  # mlx-lm's base + adapter
    assert np.abs(reference - mlx_logits(tiny_model)).max() > 1e-3  # training moved it
    np.testing.assert_allclose(mlx_logits(fused), reference, atol=1e-4, rtol=1e-4)

    record = json.loads((fused / "fused_from.json").read_text())
    assert record["checkpoint"] == "final" and record["step"] == 6
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["type"] == "fuse" and log[-1]["output"] == str(fused)

    # transformers reads the same model (its chat template included).
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(fused), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(fused))
    assert tok.chat_template
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(TEXT)])).logits.numpy()
    np.testing.assert_allclose(logits, reference, atol=1e-3, rtol=1e-3)


def test_fuse_step_n_is_the_trainer_at_step_n(mlx_run, tiny_model, tmp_path):
    from mlx_tune.backends.mlx.backend import MLXBackend
    from mlx_tune.checkpoint.manager import CheckpointManager

    spec, out = mlx_run
    assert main(["fuse", str(out), "--checkpoint", "step-3", "--output", str(tmp_path / "f3")]) == 0
    # Reference: the backend restored from the checkpoint, as a resume would.
    backend = MLXBackend()
    backend.load(spec, tiny_model)
    manager = CheckpointManager(out / "checkpoints", backend.codec, log=lambda m: None)
    backend.load_state_dict(*manager.load(out / "checkpoints" / "step-0000003"))
    backend.model.eval()
    ids = mx.array([backend.tokenizer.encode(TEXT)])
    expected = np.array(backend.model(ids), dtype=np.float32)
    np.testing.assert_allclose(mlx_logits(tmp_path / "f3"), expected, atol=1e-4, rtol=1e-4)
    assert np.abs(expected - mlx_logits(tiny_model, out / "adapters")).max() > 1e-4
    assert json.loads((tmp_path / "f3" / "fused_from.json").read_text())["step"] == 3


def test_gguf_export_and_refusals(mlx_run, tiny_model, tmp_path, capsys):
    spec, out = mlx_run
    assert main(["fuse", str(out), "--checkpoint", "best", "--output", str(tmp_path / "g"),
                 "--gguf"]) == 0
    weights, meta = mx.load(str(tmp_path / "g" / "model.gguf"), return_metadata=True)
    fused = mx.load(str(next((tmp_path / "g").glob("model*.safetensors"))))
    assert str(meta["general.architecture"]) == "llama"
    np.testing.assert_array_equal(np.array(weights["token_embd.weight"].astype(mx.float32)),
                                  np.array(fused["model.embed_tokens.weight"].astype(mx.float32)))

    capsys.readouterr()
    assert main(["fuse", str(out), "--checkpoint", "step-99", "--output", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "step-99" in err and "step-3" in err and "Traceback" not in err

    # An architecture mlx-lm's GGUF writer does not know: a clear refusal, nothing written.
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    run_copy = tmp_path / "run-copy"
    shutil.copytree(out, run_copy)
    text = (run_copy / "spec.yaml").read_text().replace(str(tiny_model), str(other))
    (run_copy / "spec.yaml").write_text(text)
    assert main(["fuse", str(run_copy), "--output", str(tmp_path / "q"), "--gguf"]) == 1
    err = capsys.readouterr().err
    assert "qwen2" in err and "GGUF" in err and not (tmp_path / "q").exists()


@pytest.mark.torch
def test_fused_torch_run_equals_base_plus_adapter(tiny_model, tiny_spec, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    trained(tiny_spec(FUSED_RUN, output_dir=out, backend="torch", max_steps=3,
                      torch_threads=1, fine_tune_type="dora"))
    assert main(["fuse", str(out), "--output", str(tmp_path / "fused")]) == 0
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
        reference = PeftModel.from_pretrained(base, str(out / "adapters")).eval()(ids).logits
        fused = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fused"), dtype=torch.float32)
        np.testing.assert_allclose(fused(ids).logits.numpy(), reference.numpy(),
                                   atol=1e-4, rtol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
        assert (plain(ids).logits - reference).abs().max() > 1e-4
    # mlx-lm loads the torch-fused model too.
    np.testing.assert_allclose(mlx_logits(tmp_path / "fused"), reference.numpy(),
                               atol=1e-3, rtol=1e-3)
