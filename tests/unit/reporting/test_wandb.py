"""Weights & Biases as a tracker: `report_to` is validated by name, and a missing wandb
is named with the command that installs it. A real offline run: tests/model/test_wandb.py."""

from __future__ import annotations

import sys

import pytest

from mlx_tune.config.spec import SpecError, build_spec


def test_report_to_validation(tmp_path, monkeypatch):
    spec = build_spec(overrides={"report_to": ["wandb"], "tensorboard": True})
    assert spec.report_to == ["tensorboard", "wandb"] and spec.tensorboard is True
    spec = build_spec(overrides={"report_to": ["tensorboard", "wandb"], "tensorboard": False})
    assert spec.report_to == ["wandb"] and spec.tensorboard is False
    assert build_spec().report_to == ["tensorboard"]
    with pytest.raises(SpecError, match=r"'report_to' has 'wanb'; each entry must be one of "
                                        r"tensorboard, wandb$"):
        build_spec(overrides={"report_to": ["wanb"]})
    bad = tmp_path / "spec.yaml"
    bad.write_text("model: x\nreport_to: [tensorboard, mlflow]\n")
    with pytest.raises(SpecError, match=r"spec.yaml:2: 'report_to' has 'mlflow'"):
        build_spec(bad)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(SpecError, match=r"wandb, which is not installed; install it with: "
                                        r"pip install 'mlx-tune\[wandb\]'"):
        build_spec(overrides={"report_to": ["wandb"]})
