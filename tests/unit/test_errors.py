"""One UserError base: every error a user can fix derives from it and carries its exit
code; the CLI turns it into one line and that code, with no list kept by hand."""

from __future__ import annotations

import pytest

import mlx_tune.cli as cli
from mlx_tune.backends.base import match_targets
from mlx_tune.checkpoint.format import CheckpointError
from mlx_tune.checkpoint.resume import ResumeError
from mlx_tune.checkpoint.rundir import RunDirError
from mlx_tune.config.schema import SpecError
from mlx_tune.data.records import DataError
from mlx_tune.errors import UserError
from mlx_tune.exit_codes import EXIT_ERROR, EXIT_USAGE
from mlx_tune.export import ExportError
from mlx_tune.models.hub import ModelError
from mlx_tune.reporting.summary import ReportError

# The eight classes cli.py used to list by hand, with the exit codes the CLI gave them.
USER_ERRORS = {SpecError: EXIT_USAGE, DataError: EXIT_ERROR, ModelError: EXIT_ERROR,
               ResumeError: EXIT_ERROR, CheckpointError: EXIT_ERROR, ExportError: EXIT_ERROR,
               ReportError: EXIT_ERROR, RunDirError: EXIT_USAGE}


@pytest.mark.parametrize("cls", list(USER_ERRORS), ids=lambda c: c.__name__)
def test_each_user_error_is_one_line_with_its_exit_code(cls, monkeypatch, capsys, tmp_path):
    assert issubclass(cls, UserError) and cls.exit_code == USER_ERRORS[cls]
    monkeypatch.chdir(tmp_path)

    def fail(args):
        raise cls("data/train.jsonl: line 3: expected a JSON object")

    monkeypatch.setattr(cli, "run_command", fail)
    assert cli.main(["doctor"]) == USER_ERRORS[cls]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mlx-tune: error: data/train.jsonl: line 3: expected a JSON object"]
    assert not (tmp_path / "mlx-tune-crash.log").exists()


def test_a_bug_is_still_a_crash_log(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "run_command", lambda args: {}["missing"])
    assert cli.main(["doctor"]) == EXIT_ERROR
    assert "KeyError" in capsys.readouterr().err
    assert "Traceback" in (tmp_path / "mlx-tune-crash.log").read_text()


def test_a_target_the_model_lacks_is_a_spec_error():
    # A GPT-2-style block: no gate/up/down projections.
    names = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.c_fc"]
    assert match_targets(names, ["q", "o"]) == ["attn.q_proj", "attn.out_proj"]
    with pytest.raises(SpecError, match=r"lora.targets: this model has no 'gate' projection "
                                        r"\(its linear layers are: attn.k_proj"):
        match_targets(names, ["q", "gate"])
