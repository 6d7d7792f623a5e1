"""num_epochs instead of max_steps: exactly one of the two sets the run's length.
The runs themselves are in tests/model/test_epochs.py."""

import pytest

from mlx_tune.config.schema import SpecError
from mlx_tune.config.spec import build_spec


def test_exactly_one_of_max_steps_and_num_epochs():
    with pytest.raises(SpecError, match="either 'max_steps' or 'num_epochs'"):
        build_spec(overrides={"max_steps": 10, "num_epochs": 2})
    with pytest.raises(SpecError, match="num_epochs"):
        build_spec(overrides={"num_epochs": 0})
    assert build_spec().max_steps == 2000 and build_spec(overrides={"num_epochs": 1.5}).max_steps is None
