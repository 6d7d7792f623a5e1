"""W&B trouble never costs the night: an endpoint that does not answer, or a tracker that
fails mid-run, gives one warning line naming W&B and the run trains on with the other
trackers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("wandb")

from mlx_tune.reporting.factory import make_reporters  # noqa: E402
from mlx_tune.reporting.records import Reporters  # noqa: E402
from mlx_tune.reporting.wandb_reporter import WandbReporter  # noqa: E402


def messages(path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("type") == "message"]


@pytest.fixture
def fresh_wandb():
    """wandb keeps its settings (the mode, the endpoint) in a process-wide singleton: an
    earlier offline run in this process would make init succeed offline here."""
    import wandb
    wandb.teardown()
    yield
    wandb.teardown()


def test_unanswering_endpoint_warns_once_and_keeps_the_other_trackers(
        silent_server, tmp_path, monkeypatch, capsys, fresh_wandb):
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    reps = make_reporters("plain", output_dir=tmp_path, total_steps=10, resume_step=None,
                          report_to=("tensorboard", "wandb"), config={"model": "x"})
    names = [type(r).__name__ for r in reps]
    assert "WandbReporter" not in names and "TensorBoardReporter" in names
    warning = capsys.readouterr().out.strip().splitlines()
    assert len([w for w in warning if "W&B" in w]) == 1
    line = next(w for w in warning if "W&B" in w)
    assert line.startswith("warning: W&B could not start") and "training on without it" in line
    logged = messages(tmp_path / "metrics.jsonl")
    assert any("W&B" in m["text"] and "\n" not in m["text"] for m in logged)
    reps.close()


class BrokenRun:
    @property
    def summary(self):
        raise ConnectionError("upstream went away\nretrying in 30s\n(traceback follows)")

    def finish(self, exit_code=0):
        pass


def test_a_failure_mid_run_is_one_line_naming_wandb(capsys):
    wandb = WandbReporter.__new__(WandbReporter)
    wandb.run, wandb._step, wandb._exit_code = BrokenRun(), 0, 0
    reps = Reporters([wandb])
    reps.on_stop("finished", 0)
    reps.on_stop("finished", 0)  # further failures silenced
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["reporter W&B.on_stop failed (further failures silenced): "
                   "ConnectionError: upstream went away"]
