"""A missing init_adapter is one line before anything loads, and names the shipped config
whose run writes it (configs/dpo.yaml starts from the quickstart's adapter)."""

from __future__ import annotations

import pytest

from mlx_tune.config.schema import SpecError
from mlx_tune.training.setup import check_init_adapter


def test_a_missing_init_adapter_names_the_config_that_trains_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text("output_dir: runs/quickstart\n")
    (tmp_path / "configs" / "broken.yaml").write_text("output_dir: [unclosed\n")
    with pytest.raises(SpecError, match=r"runs/quickstart/adapters does not exist; run "
                       r"`mlx-tune train --config configs/quickstart.yaml` first$"):
        check_init_adapter("runs/quickstart/adapters")
    with pytest.raises(SpecError, match="a run whose output_dir is runs/other writes it"):
        check_init_adapter("runs/other/adapters")
    (tmp_path / "runs" / "quickstart" / "adapters").mkdir(parents=True)
    check_init_adapter("runs/quickstart/adapters")
    check_init_adapter(None)
