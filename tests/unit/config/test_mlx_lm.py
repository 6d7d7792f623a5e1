"""mlx-lm LoRA configs accepted by `mlx-tune train --config`, translated key by key."""

from __future__ import annotations

import pytest

from mlx_tune.cli import main
from mlx_tune.config import mlx_lm
from mlx_tune.config.schema import SpecError
from mlx_tune.config.spec import build_spec

# Written the way mlx-lm's LORA.md / examples/lora_config.yaml document a config.
LORA_CONFIG = """\
model: "mlx_model"
train: true
fine_tune_type: lora
optimizer: adamw
optimizer_config:
  adamw:
    weight_decay: 0.05
data: "data/recipes"
seed: 3
num_layers: 4
batch_size: 2
iters: 600
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
resume_adapter_file: null
adapter_path: "adapters"
save_every: 100
test: true
test_batches: 100
max_seq_length: 2048
grad_checkpoint: true
grad_accumulation_steps: 2
mask_prompt: true
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.1
lr_schedule:
  name: cosine_decay
  warmup: 100
  warmup_init: 1e-7
  arguments: [1e-5, 600, 1e-7]
"""


def test_a_documented_config_is_translated_and_each_translation_reported(tmp_path):
    path = tmp_path / "lora_config.yaml"
    path.write_text(LORA_CONFIG)
    notes = []
    spec = build_spec(path, log=notes.append)
    assert (spec.model, spec.data, spec.seed, spec.optimizer) == \
        ("mlx_model", "data/recipes", 3, "adamw")
    assert (spec.max_steps, spec.batch_size, spec.eval_steps, spec.report_every,
            spec.checkpoint_interval, spec.max_length) == (600, 2, 200, 10, 100, 2048)
    assert spec.lora.layers == 4 and spec.lora.rank == 8 and spec.lora.dropout == 0.1
    assert spec.lora.scale == 20.0  # mlx-lm's scale is our alpha / rank
    assert spec.lora.targets == ["q", "v", "down"]
    assert spec.gradient_checkpointing and spec.gradient_accumulation_steps == 2
    assert spec.mask_prompt and spec.test_at_end and spec.test_batches == 100
    assert spec.weight_decay == 0.05 and spec.output_dir == "adapters"
    assert (spec.lr_schedule, spec.warmup_steps, spec.learning_rate, spec.min_lr) == \
        ("cosine", 100, 1e-5, 1e-7)
    assert "mlx-lm config: iters 600 -> max_steps 600" in notes
    assert "mlx-lm config: lora_parameters.scale 20.0 -> lora.alpha 160.0" in notes
    assert len(notes) == len(set(notes))


def test_absent_keys_take_mlx_lm_defaults_not_ours(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d\niters: 5\n")
    spec = build_spec(path, log=lambda m: None)
    # mlx-lm's own defaults are the reference.
    defaults = pytest.importorskip("mlx_lm.lora").CONFIG_DEFAULTS
    for key, value in mlx_lm.DEFAULTS.items():
        assert defaults[key] == value, key
    assert (spec.batch_size, spec.learning_rate, spec.lora.layers, spec.mask_prompt,
            spec.optimizer, spec.lr_schedule, spec.warmup_steps) == \
        (defaults["batch_size"], defaults["learning_rate"], defaults["num_layers"],
         defaults["mask_prompt"], defaults["optimizer"], "constant", 0)
    assert spec.lora.alpha / spec.lora.rank == defaults["lora_parameters"]["scale"]


@pytest.mark.parametrize("extra, message", [
    ("report_to: wandb\n", "c.yaml:3: mlx-lm key 'report_to' has no mlx-tune equivalent"),
    ("optimizer: muon\n", "c.yaml:3: mlx-lm key 'optimizer' 'muon' has no mlx-tune equivalent"),
    ("lora_parameters:\n  keys: [self_attn.qkv]\n", "lora_parameters' keys has 'self_attn.qkv'"),
    ("lr_schedule:\n  name: exponential_decay\n", "'lr_schedule' must name cosine_decay"),
    ("flux_capacitor: 1\n", "c.yaml:3: mlx-lm key 'flux_capacitor' is not an mlx-lm LoRA config"),
    ("train: false\n", "c.yaml:3: mlx-lm key 'train' is false"),
])
def test_keys_without_an_equivalent_are_refused_by_name(tmp_path, extra, message):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\niters: 5\n" + extra)
    with pytest.raises(SpecError) as e:
        build_spec(path, log=lambda m: None)
    assert message in str(e.value)


def test_print_config_shows_the_translated_spec(tmp_path, capsys):
    path = tmp_path / "lora_config.yaml"
    path.write_text(LORA_CONFIG)
    assert main(["train", "--config", str(path), "--print-config", "--max-steps", "7"]) == 0
    out = capsys.readouterr()
    assert "max_steps: 7\n" in out.out and "rank: 8\n" in out.out and "alpha: 160.0" in out.out
    assert "mlx-lm config: iters 600 -> max_steps 600" in out.err


# hf_dataset as mlx-lm's LORA.md documents it.
HF_CONFIG = """\
model: "mlx_model"
train: true
hf_dataset:
  path: "billsum"
  train_split: "train"
  valid_split: "test"
  prompt_feature: "text"
  completion_feature: "summary"
"""


def test_hf_dataset_is_translated(tmp_path):
    path = tmp_path / "lora_config.yaml"
    path.write_text(HF_CONFIG)
    lines = []
    spec = build_spec(path, log=lines.append)
    assert (spec.data, spec.data_split, spec.val_split) == ("billsum", "train", "test")
    assert spec.data_fields == {"prompt": "text", "completion": "summary"}
    assert "mlx-lm config: hf_dataset.prompt_feature text -> data_fields.prompt text" in lines
    # Without splits, mlx-lm holds out the end of train: a seeded tenth here.
    path.write_text("train: true\nhf_dataset:\n  path: billsum\n")
    assert build_spec(path, log=lines.append).val_split == 0.1


@pytest.mark.parametrize("body, message", [
    ("  path: billsum\n  train_split: 'train[:80%]'\n", "train_split 'train\\[:80%\\]'"),
    ("  path: billsum\n  config: {name: x}\n", "has 'config'"),
])
def test_hf_dataset_without_equivalent_is_refused(tmp_path, body, message):
    path = tmp_path / "lora_config.yaml"
    path.write_text("train: true\nhf_dataset:\n" + body)
    with pytest.raises(SpecError, match=rf"lora_config.yaml:2: mlx-lm key 'hf_dataset' .*{message}"):
        build_spec(path, log=lambda _: None)
