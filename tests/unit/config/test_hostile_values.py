"""Numbers and mlx-lm configs a hostile user writes (issue 22): NaN and infinity in any
numeric key, values of the wrong type, refused in one line naming file, line and key
before anything is written."""

from __future__ import annotations

import pytest

from mlx_tune.cli import main
from mlx_tune.config.schema import SpecError
from mlx_tune.config.spec import build_spec
from mlx_tune.exit_codes import EXIT_USAGE


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "traceback in" not in err, err
    return err


# ------------------------------------------------------------------ numbers and configs

@pytest.mark.parametrize("flags,key", [
    (["--num-epochs", "nan"], "num_epochs"),
    (["--num-epochs", "inf"], "num_epochs"),
    (["--num-epochs", "1e300"], "num_epochs"),
    (["--learning-rate", "inf"], "learning_rate"),
    (["--betas", "[0.9, .nan]"], "betas"),
    (["--lora-alpha=-inf"], "lora.alpha"),
])
def test_non_finite_numbers_are_refused_before_anything_is_written(tmp_path, capsys, flags, key):
    out = tmp_path / "run"
    argv = ["train", "--model", "m", "--data", str(tmp_path), "--output-dir", str(out), *flags]
    assert main(argv) == EXIT_USAGE
    assert f"'{key}'" in one_line(capsys)
    assert not out.exists()  # no spec.yaml written before the refusal


def test_non_finite_numbers_in_yaml_name_the_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("model: m\nwarmup_ratio: .nan\n")
    with pytest.raises(SpecError, match=rf"^{path}:2: 'warmup_ratio' is nan; expected a finite"):
        build_spec(path)


@pytest.mark.parametrize("body,culprit", [
    ("lora_parameters: {rank: eight, scale: 2.0}", "rank is 'eight'; expected an integer"),
    ("lora_parameters: {rank: 8, scale: big}", "scale is 'big'; expected a number"),
    ("lora_parameters: {rank: 8, keys: [[q]]}", "'lora_parameters' has a value of the wrong type"),
    ("optimizer_config: {adam: [1, 2]}", "'optimizer_config' has a value of the wrong type"),
    ("lr_schedule: {name: cosine_decay, arguments: 5}", "'lr_schedule' has a value of the wrong"),
    ("lr_schedule: {name: cosine_decay, warmup: soon}", "'lr_schedule' has a value of the wrong"),
    ("lr_schedule: {name: [cosine_decay]}", "'lr_schedule' has a value of the wrong type"),
    ("iters: many", "'max_steps' is 'many'; expected an integer"),
])
def test_mlx_lm_config_values_of_the_wrong_type_name_file_line_and_key(tmp_path, body, culprit):
    path = tmp_path / "lora_config.yaml"
    path.write_text(f"model: m\ndata: d\nsteps_per_report: 5\n{body}\n")
    with pytest.raises(SpecError) as e:
        build_spec(path, log=lambda m: None)
    assert str(e.value).startswith(f"{path}:4: ") and culprit in str(e.value)


def test_mlx_lm_scale_written_as_yaml_text_still_reads(tmp_path):
    path = tmp_path / "lora_config.yaml"  # YAML 1.1 reads 1e1 as text; mlx-lm takes it
    path.write_text("model: m\niters: 5\nlora_parameters: {rank: 4, scale: 1e1}\n")
    assert build_spec(path, log=lambda m: None).lora.alpha == 40.0
