"""preference.reference: auto resolves to the reference a run can have (adapter_off for an
adapter from the base model, precomputed for full fine-tuning and init_adapter); a choice
that would silently mean another policy, or that an objective would ignore, is refused
in one line before anything loads."""

from __future__ import annotations

import pytest

from mlx_tune.config.schema import SpecError
from mlx_tune.config.spec import build_spec, reference_mode


def spec(**overrides):
    return build_spec(overrides={"model": "m", "data": "d", **overrides})


@pytest.mark.parametrize("overrides, mode", [
    ({"objective": "dpo"}, "adapter_off"),
    ({"objective": "dpo", "fine_tune_type": "dora"}, "adapter_off"),
    ({"objective": "dpo", "fine_tune_type": "full"}, "precomputed"),
    ({"objective": "dpo", "init_adapter": "runs/sft/adapters"}, "precomputed"),
    ({"objective": "dpo", "preference.reference": "precomputed"}, "precomputed"),
    ({"objective": "orpo"}, None),
    ({"objective": "sft", "init_adapter": "runs/sft/adapters"}, None),
])
def test_auto_resolves_to_the_reference_the_run_can_have(overrides, mode):
    assert reference_mode(spec(**overrides)) == mode


@pytest.mark.parametrize("overrides, message", [
    ({"objective": "dpo", "fine_tune_type": "full", "preference.reference": "adapter_off"},
     "adapter_off needs a LoRA/DoRA adapter"),
    ({"objective": "dpo", "init_adapter": "a", "preference.reference": "adapter_off"},
     "not init_adapter's"),
    ({"objective": "orpo", "preference.reference": "precomputed"},
     "objective orpo does not use it"),
    ({"objective": "sft", "preference.reference": "adapter_off"},
     "objective sft does not use it"),
    ({"objective": "dpo", "fine_tune_type": "full", "streaming": True},
     "turn streaming off"),
])
def test_a_reference_the_run_cannot_have_is_refused_in_one_line(overrides, message):
    with pytest.raises(SpecError, match=message) as info:
        spec(**overrides)
    assert "\n" not in str(info.value) and "preference.reference: " in str(info.value)
