"""Sample generation at evaluation time and pluggable metric functions."""

import pytest

from mlx_tune.training.samples import load_metric, run_samples
from mlx_tune.config.schema import SpecError
from mlx_tune.config.spec import build_spec


def word_count(text: str) -> float:  # a metric, referenced as 'tests.unit.training.test_samples:word_count'
    return float(len(text.split()))


class EchoBackend:
    def __init__(self):
        self.prompts = []

    def generate(self, messages, max_tokens, tools=None):
        self.prompts.append((messages, max_tokens))
        return "stir the soup gently"


class Valid:
    def first_samples(self, n):
        return [([{"role": "system", "content": "be brief"},
                  {"role": "user", "content": f"question {i}"}], None) for i in range(n)]


class Data:
    valid = Valid()


def test_samples_come_from_validation_and_are_scored():
    spec = build_spec(overrides={"num_samples": 2, "sample_max_tokens": 7,
                                 "eval_metrics": ["tests.unit.training.test_samples:word_count"]})
    backend = EchoBackend()
    samples = run_samples(backend, spec, Data())
    assert [s["prompt"] for s in samples] == ["question 0", "question 1"]
    assert samples[0]["text"] == "stir the soup gently"
    assert samples[0]["metrics"] == {"word_count": 4.0}
    assert backend.prompts[0][1] == 7


def test_spec_prompts_win_and_zero_samples_is_off():
    spec = build_spec(overrides={"sample_prompts": ["How long for rice?"], "num_samples": 1})
    assert run_samples(EchoBackend(), spec, Data())[0]["prompt"] == "How long for rice?"
    assert run_samples(EchoBackend(), build_spec(overrides={"num_samples": 0}), Data()) == []


def test_a_metric_that_cannot_be_loaded_is_a_one_line_error():
    with pytest.raises(SpecError, match="eval_metrics: cannot load 'nowhere.mod:fn'"):
        load_metric("nowhere.mod:fn")
