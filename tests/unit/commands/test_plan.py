"""The memory planner: parameter counts, the proposal, the presets. The estimate against
the measured peak of real MLX training steps is in tests/model/test_plan.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlx_tune.commands import plan
from mlx_tune.models.hub import ModelError
from mlx_tune.commands.plan import plan_cli
from mlx_tune.training import planner
from mlx_tune.training.planner import (ModelShape, estimate, plan_accumulation, propose,
                                       weight_bytes)
from mlx_tune.config.spec import build_spec

PRESETS = Path(__file__).resolve().parents[3] / "configs" / "presets"
GB = 1e9

# NousResearch/Hermes-2-Pro-Mistral-7B's config.json (Mistral-7B + 32 ChatML tokens).
HERMES_7B = {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
             "vocab_size": 32032, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
# preset file -> the memory it is written for (GB)
PRESET_MEMORY = {"hermes-7b-qlora-m3-ultra-96gb.yaml": 96,
                 "hermes-7b-qlora-macbook-18gb.yaml": 18,
                 "hermes-7b-qlora-nvidia-24gb.yaml": 24}


def spec_of(**flat):
    return build_spec(None, {"model": "m", **flat})


def test_mistral_7b_counts():
    shape = ModelShape.from_config(HERMES_7B)
    assert shape.head_dim == 128 and shape.kv_heads == 8
    assert shape.params() == 7_241_994_240  # 7.24B, as published
    lora = estimate(shape, spec_of(**{"lora.rank": 8}), 1, 512)
    assert lora.trainable == 20_971_520  # r=8 on all 7 projections of 32 blocks
    assert estimate(shape, spec_of(fine_tune_type="full"), 1, 512).trainable == shape.params()
    # 4-bit: half a byte per weight + a bf16 scale and bias per 64 -> 4.5 bits.
    q4 = weight_bytes(shape, 4, 2)
    assert 4.0 * GB < q4 < 4.2 * GB
    assert weight_bytes(shape, None, 2) == shape.params() * 2


def test_what_moves_the_estimate():
    shape = ModelShape.from_config(HERMES_7B)
    base = dict(quantize=4, max_length=1024)
    e = lambda **kw: estimate(shape, spec_of(**{**base, **kw}), 1, 1024)
    assert e(gradient_checkpointing=True).total < 0.5 * e().total
    assert e(**{"lora.dropout": 0.0}).total < e().total
    assert e(optimizer="sgd").grads_optimizer < e().grads_optimizer
    full = estimate(shape, spec_of(fine_tune_type="full", max_length=1024), 1, 1024)
    assert full.grads_optimizer > 5 * full.weights / 2  # grads + 2 moments + the update
    plain = {**base, "memory.chunked_loss": False}
    big, small = (estimate(shape, spec_of(**plain), mb, 1024) for mb in (4, 1))
    assert big.activations == pytest.approx(4 * small.activations)
    assert big.logits == pytest.approx(4 * small.logits)  # B*L*vocab float32 arrays
    # chunked (the MLX default for LoRA): a bounded number of chunks' logits plus the
    # float32 hidden-state gradient, far less than 4 x 1024 x 32032 float32 x 4 copies
    big_chunked = estimate(shape, spec_of(**base), 4, 1024)
    assert big_chunked.logits < big.logits / 3
    assert big_chunked.logits >= 4 * 1024 * 4096 * 4
    torch = estimate(shape, spec_of(**base), 1, 1024, backend="torch")
    assert torch.activations < small.activations  # fused attention: no L*L probabilities


def test_proposal_keeps_the_effective_batch_and_fits():
    shape = ModelShape.from_config(HERMES_7B)
    spec = spec_of(quantize=4, batch_size=8, max_length=1024, gradient_checkpointing=True)
    best, fits = propose(shape, spec, 10 * GB)
    assert fits and best.micro_batch * best.accumulation == 8 and best.total <= 10 * GB
    # one size up would not have fitted
    assert estimate(shape, spec, best.micro_batch * 2, 1024).total > 10 * GB
    assert propose(shape, spec, 1000 * GB)[0].accumulation == 1
    worst, fits = propose(shape, spec, 1 * GB)
    assert not fits and worst.micro_batch == 1 and worst.accumulation == 8


def test_plan_accumulation_reads_config_and_budget(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HERMES_7B))
    spec = lambda gb: build_spec(None, {"model": str(tmp_path), "quantize": 4, "batch_size": 8,
                                        "max_length": 1024, "gradient_checkpointing": True,
                                        "gradient_accumulation_steps": "auto",
                                        "memory_budget_gb": gb})
    assert plan_accumulation(spec(1000), tmp_path, "mlx", 1) == 1
    steps = plan_accumulation(spec(12), tmp_path, "mlx", 1)
    assert steps in (2, 4, 8) and 8 % steps == 0
    assert plan_accumulation(spec(1), tmp_path, "mlx", 1) == 8
    # The world size is the caller's (the running backend's), not the environment's: two
    # ranks each hold 4 of the 8 sequences, so at most 4 micro-batches of one.
    assert plan_accumulation(spec(1), tmp_path, "mlx", 2) == 4
    assert plan_accumulation(spec(1), tmp_path, "torch", 4) == 2


def test_plan_cli_on_a_config_only_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(HERMES_7B))
    spec = build_spec(None, {"model": str(tmp_path), "quantize": 4, "batch_size": 8,
                             "max_length": 2048, "backend": "mlx"})
    assert plan_cli(spec, SimpleNamespace(memory_gb=96.0)) == 0
    out = capsys.readouterr().out
    for row in ("params", "trainable", "weights", "grads+optimizer", "activations", "logits",
                "total (peak)", "headroom"):
        assert row in out
    assert "75% of --memory-gb 96" in out
    assert "--gradient-accumulation-steps" in out
    assert plan_cli(spec, SimpleNamespace(memory_gb=4.0)) == 1  # nothing fits in 3 GB


def test_config_of_a_hub_id_comes_from_the_cache_only(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "config.json").write_text(json.dumps(HERMES_7B))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name: str(tmp_path / name) if repo == "org/cached" else None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: 1 / 0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert plan.load_config("org/cached", spec_of())["hidden_size"] == 4096
    # An alias maps to its repo; not cached and offline: a one-line error, no download.
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        plan.load_config("Hermes-2-Pro-Mistral-7B", spec_of())


def test_detected_memory_is_plausible():
    total, what = planner.detect_memory("mlx")
    assert total > 0.1 * GB and what
    budget, why = planner.budget_bytes(spec_of(memory_budget_gb=10.0))
    assert budget == 10 * GB and why == "memory_budget_gb"
    assert planner.budget_bytes(spec_of(), 32.0)[0] == pytest.approx(0.75 * 32 * GB)


@pytest.mark.parametrize("name", sorted(PRESET_MEMORY))
def test_presets_are_valid_and_fit_their_memory(name):
    spec = build_spec(PRESETS / name)
    assert spec.quantize == 4 and spec.batch_size == 8
    header = (PRESETS / name).read_text().split("\n\n")[0]
    backend = "torch" if spec.backend == "torch" else "mlx"
    ga = spec.gradient_accumulation_steps
    assert isinstance(ga, int), "presets pin the accumulation the planner proposed"
    e = estimate(ModelShape.from_config(HERMES_7B), spec, spec.batch_size // ga,
                 spec.max_length, ga, backend)
    assert e.total <= 0.75 * PRESET_MEMORY[name] * GB
    # The header quotes the planner's number: keep it in sync when the planner changes.
    assert f"{e.total / GB:.1f} GB" in header, header


# -- estimate vs measured, on the real tiny model ----------------------------------------
