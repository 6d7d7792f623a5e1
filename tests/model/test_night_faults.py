"""Never lose a night, round two (real runs of the tiny model): bad data met mid-run,
failing saves, a checkpoint whose tensors do not fit. Signals during the final save are in
tests/e2e/test_night_faults.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from mlx_tune.checkpoint.format import sha256_file
from mlx_tune.checkpoint.manager import CheckpointManager, NumpyCodec
from mlx_tune.data import DataError
from mlx_tune.exit_codes import EXIT_BAD_DATA, EXIT_CHECKPOINT_FAILURES
from mlx_tune.training.recipe import train


SAVE_EVERY_2 = {"checkpoint_interval": 2}


@pytest.fixture
def data(tmp_path, tiny_data) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for name in ("train.jsonl", "valid.jsonl"):
        shutil.copy(tiny_data / name, d / name)
    return d


def steps_of(out: Path) -> list[int]:
    return [s for _, s in CheckpointManager(out / "checkpoints", NumpyCodec(),
                                            log=lambda m: None).discover()]


def test_streaming_bad_line_fails_before_step_1(tiny_spec, data, tmp_path):
    lines = (data / "train.jsonl").read_text().splitlines(keepends=True)
    lines.insert(len(lines) - 2, '{"messages": [{"role": "user"}]}\n')  # near the end
    (data / "train.jsonl").write_text("".join(lines))
    out = tmp_path / "run"
    with pytest.raises(DataError) as ei:
        train(tiny_spec(data=data, output_dir=out, **SAVE_EVERY_2, streaming=True),
              resume="auto", log=lambda m: None)
    assert f"train.jsonl:{len(lines) - 2}:" in str(ei.value)
    assert steps_of(out) == [] and not (out / "metrics.jsonl").exists()


def test_bad_validation_line_mid_run_keeps_the_step_and_resumes(tiny_spec, data, tmp_path):
    out = tmp_path / "run"
    good = (data / "valid.jsonl").read_text()

    def break_valid_once_loaded(message: str) -> None:
        # Printed by load_data after its up-front checks: the file now breaks under the
        # run, as when it is edited or truncated during the night.
        if message.startswith("train:"):
            (data / "valid.jsonl").write_text("{not json\n" + good)

    result = train(tiny_spec(data=data, output_dir=out, **SAVE_EVERY_2, eval_at_start=False),
                   resume="auto", log=break_valid_once_loaded)
    assert result.exit_code == EXIT_BAD_DATA and result.step == 4
    assert "valid.jsonl:1" in result.reason and "\n" not in result.reason
    assert 4 in steps_of(out)  # the step of the failed evaluation is checkpointed
    (data / "valid.jsonl").write_text(good)
    logs: list[str] = []
    done = train(tiny_spec(data=data, output_dir=out, **SAVE_EVERY_2), resume="auto",
                 log=logs.append)
    assert done.exit_code == 0 and done.step == 8
    assert any("resumed from" in ln and "at step 4" in ln for ln in logs)


def test_three_failed_saves_exit_7_even_when_the_adapter_cannot_be_written(
        tiny_spec, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapters").write_text("a file where the adapter directory should go")
    monkeypatch.setenv("MLX_TUNE_FAULTS", "disk_full")
    result = train(tiny_spec(data=data, output_dir=out, **SAVE_EVERY_2), resume="auto",
                   log=lambda m: None)
    assert result.exit_code == EXIT_CHECKPOINT_FAILURES and result.step == 6
    assert "adapter not written" in result.reason and "\n" not in result.reason
    assert steps_of(out) == []


def test_checkpoint_missing_optimizer_tensors_falls_back(tiny_spec, data, tmp_path):
    out = tmp_path / "run"
    spec = tiny_spec(data=data, output_dir=out, **SAVE_EVERY_2, max_steps=4, eval_steps=100)
    assert train(spec, resume="auto", log=lambda m: None).exit_code == 0
    newest = out / "checkpoints" / "step-0000004"
    # Drop the optimizer tensors, then re-sign the files: they verify, the state is wrong.
    manifest = json.loads((newest / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["name"].endswith(".safetensors"):
            path = newest / entry["name"]
            arrays = {k: v for k, v in load_file(str(path)).items()
                      if not k.startswith("optimizer/")}
            save_file(arrays, str(path))
            entry.update(size=path.stat().st_size, sha256=sha256_file(path))
            entry["arrays"] = {k: v for k, v in entry["arrays"].items() if k in arrays}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    logs: list[str] = []
    result = train(tiny_spec(data=data, output_dir=out, **SAVE_EVERY_2, max_steps=6,
                             eval_steps=100), resume="auto", log=logs.append)
    assert result.exit_code == 0 and result.step == 6
    assert any("skipping" in ln and "step-0000004" in ln and "optimizer" in ln for ln in logs)
    assert any("resumed from" in ln and "at step 2" in ln for ln in logs)
