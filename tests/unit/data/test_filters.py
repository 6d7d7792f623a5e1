"""Curriculum stages, the quality ramp, and augmentation."""

from __future__ import annotations

import re

import pytest

from mlx_tune.data import DataError, load_data
from mlx_tune.data.augment import Augmenter, load_templates
from mlx_tune.data.filters import quality_threshold, stage_for_epoch
from mlx_tune.data.testing import tiny_tokenizer, write_jsonl
from mlx_tune.config.schema import AugmentationSpec, CurriculumStage, QualitySpec
from mlx_tune.config.spec import build_spec


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def record(i):
    """Record i: difficulty 1+i%3, quality (i%10)/10, 1 or 2 user turns, tagged 'd<diff>q<q>t<turns>'."""
    d, q, turns = 1 + i % 3, (i % 10) / 10, 1 + (i % 4 == 0)
    tag = f"r{i} d{d} q{q} t{turns}"
    messages = [{"role": "user", "content": tag}, {"role": "assistant", "content": "Cook."}]
    if turns == 2:
        messages += [{"role": "user", "content": "more"}, {"role": "assistant", "content": "Ok."}]
    return {"messages": messages, "quality": q, "difficulty": d}


@pytest.fixture
def data_dir(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [record(i) for i in range(60)])
    return tmp_path


def tags_by_epoch(bundle, tok, epochs):
    """Tags of every record in the batches of the first `epochs` epochs."""
    out = [[] for _ in range(epochs)]
    while True:
        batch = bundle.train.next_batch()
        if bundle.train.epoch >= epochs:
            return out
        out[bundle.train.epoch] += [
            re.search(r"r\d+ d(\d) q([\d.]+) t(\d)", tok.decode(row)).groups()
            for row in batch.tokens]


def test_stage_selection():
    stages = [CurriculumStage(until_epoch=1, max_difficulty=1), CurriculumStage(until_epoch=3)]
    assert [stage_for_epoch(stages, e)[0] for e in range(5)] == [1, 2, 2, None, None]
    assert stage_for_epoch([], 0) == (None, None)


def test_quality_ramp():
    q = QualitySpec(start=0.4, end=0.7, ramp_epochs=3)
    assert [quality_threshold(q, e) for e in range(6)] == [0.4, 0.5, 0.6, 0.7, 0.7, 0.7]
    assert quality_threshold(QualitySpec(start=0.2, end=0.6, ramp_epochs=0), 0) == 0.6
    assert quality_threshold(QualitySpec(), 5) is None  # start unset: no filter


def test_curriculum_and_quality_per_epoch(data_dir, tok):
    logs = []
    spec = build_spec(overrides={
        "data": str(data_dir), "batch_size": 1, "prefetch": 0, "max_length": 64,
        "curriculum": [{"until_epoch": 1, "max_difficulty": 1},
                       {"until_epoch": 2, "max_turns": 1}],
        "quality": {"start": 0.2, "end": 0.6, "ramp_epochs": 2}})
    bundle = load_data(spec, tok, log=logs.append)
    e0, e1, e2 = tags_by_epoch(bundle, tok, 3)
    diff1 = [i for i in range(60) if 1 + i % 3 == 1]
    expect0 = [i for i in diff1 if (i % 10) / 10 >= 0.2]
    one_turn = [i for i in range(60) if i % 4]
    expect1 = [i for i in one_turn if (i % 10) / 10 >= 0.4]
    expect2 = [i for i in range(60) if (i % 10) / 10 >= 0.6]
    assert len(e0) == len(expect0) and all(d == "1" and float(q) >= 0.2 for d, q, _ in e0)
    assert len(e1) == len(expect1) and all(t == "1" and float(q) >= 0.4 for _, q, t in e1)
    assert len(e2) == len(expect2) and all(float(q) >= 0.6 for _, q, _ in e2)
    assert f"epoch 0: curriculum stage 1 keeps {len(diff1)}/60 records; quality >= 0.2 keeps {len(expect0)}" in logs
    assert f"epoch 1: curriculum stage 2 keeps {len(one_turn)}/60 records; quality >= 0.4 keeps {len(expect1)}" in logs
    assert f"epoch 2: curriculum complete, 60/60 records; quality >= 0.6 keeps {len(expect2)}" in logs


def test_max_tokens_stage_and_missing_metadata_kept(tmp_path, tok):
    rows = [{"text": "fox " * n} for n in (1, 2, 3, 20, 30)] + [{"text": "x", "quality": 0.0}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    logs = []
    spec = build_spec(overrides={"data": str(tmp_path), "batch_size": 1, "prefetch": 0,
                                 "curriculum": [{"until_epoch": 1, "max_tokens": 9}],
                                 "quality": {"start": 0.5}})
    bundle = load_data(spec, tok, log=logs.append)
    bundle.train.next_batch()
    # Short texts pass max_tokens; records without quality pass the quality rule.
    assert logs[-1] == "epoch 0: curriculum stage 1 keeps 4/6 records; quality >= 0.5 keeps 3"


def test_filter_keeping_too_few_is_an_error(data_dir, tok):
    spec = build_spec(overrides={"data": str(data_dir), "batch_size": 8, "prefetch": 1,
                                 "quality": {"start": 0.95}})
    bundle = load_data(spec, tok, log=lambda m: None)
    with pytest.raises(DataError, match=r"keep 0 records, fewer than batch_size=8"):
        bundle.train.next_batch()
    bundle.close()


def test_augmentation_rate_and_determinism():
    aug = Augmenter(seed=3, prob=0.3, templates=("A {text}", "B {text}", "C {text}"))
    picks = [aug.choice(0, line) for line in range(4000)]
    rate = sum(p is not None for p in picks) / len(picks)
    assert abs(rate - 0.3) < 0.03
    used = [p for p in picks if p]
    assert all(abs(used.count(t) / len(used) - 1 / 3) < 0.05 for t in aug.templates)
    assert picks == [aug.choice(0, line) for line in range(4000)]
    assert picks != [aug.choice(1, line) for line in range(4000)]  # differs per epoch
    assert picks != [Augmenter(4, 0.3, aug.templates).choice(0, l) for l in range(4000)]


def test_augmentation_rewrites_first_user_turn_only():
    from mlx_tune.data.records import Record
    rec = Record(7, "chat", messages=({"role": "system", "content": "S"},
                                      {"role": "user", "content": "soup"},
                                      {"role": "assistant", "content": "ok"},
                                      {"role": "user", "content": "more"},
                                      {"role": "assistant", "content": "ok"}))
    out = Augmenter(0, 1.0, ("Recipe for: {text}",)).apply(rec, 0)
    assert [m["content"] for m in out.messages] == ["S", "Recipe for: soup", "ok", "more", "ok"]
    assert Augmenter(0, 1.0, ("{text}!",)).apply(Record(1, "text", text="t"), 0) is None


def test_template_without_placeholder_is_an_error(tmp_path, data_dir, tok):
    with pytest.raises(DataError, match=r"template 'Make this' has no \{text\}"):
        load_templates(AugmentationSpec(enabled=True, templates=["{text}", "Make this"]))
    with pytest.raises(DataError, match=r"template 'x \{text\} \{other\}' does not format"):
        load_templates(AugmentationSpec(enabled=True, templates=["x {text} {other}"]))
    f = tmp_path / "templates.txt"
    f.write_text("Recipe: {text}\n\nNo placeholder here\n")
    spec = build_spec(overrides={"data": str(data_dir), "batch_size": 2,
                                 "augmentation": {"enabled": True, "templates_file": str(f)}})
    with pytest.raises(DataError, match=r"templates.txt: augmentation template 'No placeholder"):
        load_data(spec, tok, log=lambda m: None)
    f.write_text("Recipe: {text}\nAsk: {text}\n")
    assert load_templates(AugmentationSpec(templates_file=str(f))) == ["Recipe: {text}",
                                                                         "Ask: {text}"]
