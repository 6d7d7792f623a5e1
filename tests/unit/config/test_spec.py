"""Spec: defaults, YAML < CLI precedence, and one-line errors that name the key."""

import subprocess
import sys

import pytest

from mlx_tune.cli import build_parser, spec_from_args
from mlx_tune.config.schema import Spec, SpecError, leaf_fields
from mlx_tune.config.spec import build_spec
from mlx_tune.checkpoint.resume import spec_fingerprint


def test_defaults_follow_the_users_proven_settings():
    s = build_spec()
    assert (s.batch_size, s.gradient_accumulation_steps, s.max_length) == (8, 1, 1024)
    assert (s.learning_rate, s.warmup_steps, s.max_steps) == (2e-4, 50, 2000)
    assert (s.eval_steps, s.val_batches, s.checkpoint_interval) == (250, 50, 250)
    assert (s.lora.rank, s.lora.alpha, s.lora.dropout) == (8, 32.0, 0.05)
    assert s.lora.scale == 4.0
    assert (s.weight_decay, s.grad_clip) == (0.01, 1.0)
    assert s.min_lr == pytest.approx(2e-5)  # derived: learning_rate / 10


def test_yaml_then_cli_precedence(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("batch_size: 4\nlora:\n  rank: 16\nlearning_rate: 1.0e-3\n")
    s = build_spec(path, {"lora.rank": 32})
    assert s.batch_size == 4  # YAML over default
    assert s.lora.rank == 32  # CLI over YAML
    assert s.learning_rate == 1e-3
    assert s.lora.alpha == 32.0  # untouched default inside a group


def test_unknown_key_names_file_line_and_closest_key(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("model: x\nlora:\n  rank: 8\n  rnak: 3\n")
    with pytest.raises(SpecError) as e:
        build_spec(path)
    assert str(e.value) == f"{path}:4: unknown key 'lora.rnak' (did you mean 'lora.rank'?)"


@pytest.mark.parametrize("override, expected", [
    ({"batch_size": "x"}, "'batch_size' is 'x'; expected an integer >= 1"),
    ({"batch_size": 0}, "'batch_size' is 0; expected an integer >= 1"),
    ({"optimizer": "adamx"}, "did you mean 'adam"),
    ({"lora.dropout": 1.5}, "'lora.dropout' is 1.5; expected a number >= 0 and <= 0.99"),
    ({"quantize": 3}, "'quantize' is 3; expected one of null, 4, 8"),
    ({"lora.targets": ["q", "zz"]}, "'lora.targets' has 'zz'"),
    ({"batch_szie": 3}, "unknown key 'batch_szie' (did you mean 'batch_size'?)"),
    ({"gradient_accumulation_steps": 3}, "must be divisible"),
    ({"min_lr": 1.0}, "'min_lr' (1.0) must not exceed 'learning_rate'"),
    ({"curriculum": [{"until_epoch": 2}, {"until_epoch": 1}]}, "increasing 'until_epoch'"),
    ({"eval_metrics": ["nocolon"]}, "must look like 'package.module:function'"),
])
def test_bad_values_get_one_line_errors_naming_the_key(override, expected):
    with pytest.raises(SpecError) as e:
        build_spec(overrides=override)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: x\nlora: [1, 2\n")
    with pytest.raises(SpecError, match=rf"{path}:\d+: invalid YAML"):
        build_spec(path)


def test_auto_accumulation_and_nested_curriculum_are_parsed():
    s = build_spec(overrides={"gradient_accumulation_steps": "auto",
                              "curriculum": [{"until_epoch": 2, "max_difficulty": 1}]})
    assert s.gradient_accumulation_steps == "auto"
    assert s.curriculum[0].max_difficulty == 1


def test_every_spec_field_has_a_flag_and_flags_parse_to_the_spec():
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "m", "--lora-rank", "16", "--lora-targets",
                              "q,v", "--no-mask-prompt", "--ema", "--ema-decay", "0.99",
                              "--quantize", "4", "--gradient-accumulation-steps", "auto",
                              "--disable-cosine-schedule", "--betas", "[0.9, 0.95]"])
    s = spec_from_args(args)
    assert (s.model, s.lora.rank, s.lora.targets) == ("m", 16, ["q", "v"])
    assert s.mask_prompt is False and s.ema.enabled is True and s.ema.decay == 0.99
    assert s.quantize == 4 and s.gradient_accumulation_steps == "auto"
    assert s.lr_schedule == "linear" and s.betas == [0.9, 0.95]
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for key, f, _ in leaf_fields():
        flag = "--" + (f.metadata.get("flag") or key.replace(".", "-").replace("_", "-"))
        assert flag in help_text, flag


def test_fingerprint_holds_the_fields_a_checkpoint_is_bound_to():
    fp = spec_fingerprint(build_spec(overrides={"model": "m", "lora.rank": 4}))
    assert fp["model"] == "m" and fp["lora.rank"] == 4
    assert fp["max_steps"] == 2000  # recorded so a change can be reported on resume
    assert fp["seed"] == 0  # changes which records a saved data position points at
    assert fp["lora.alpha"] == 32.0 and "output_dir" not in fp


def test_print_config_shows_the_resolved_spec(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: m\nbatch_size: 2\n")
    out = subprocess.run([sys.executable, "-m", "mlx_tune", "train", "--config", str(path),
                          "--print-config", "--lora-rank", "4"], capture_output=True, text=True,
                         env={"MLX_TUNE_NO_BLAS_FIX": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "batch_size: 2" in out.stdout and "rank: 4" in out.stdout
    assert "min_lr: 2.0e-05" in out.stdout


def test_cli_error_is_one_line_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mlx_tune", "train", "--model", "m",
                          "--batch-size", "zero", "--print-config"], capture_output=True,
                         text=True, env={"MLX_TUNE_NO_BLAS_FIX": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert out.stderr.strip() == ("mlx-tune: error: command line: 'batch_size' is 'zero'; "
                                  "expected an integer >= 1")


def test_spec_is_frozen():
    with pytest.raises(Exception):
        Spec().batch_size = 3  # type: ignore[misc]
