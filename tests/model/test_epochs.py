"""num_epochs instead of max_steps: one length, counted once from the data, and the
same run either way (schedule, warmup_ratio, eval cadence, dashboard total)."""

import json
from pathlib import Path

from mlx_tune.data.testing import chat, write_jsonl
from mlx_tune.training.recipe import train


# The length comes from each test (max_steps or num_epochs); warmup as a ratio of it.
EPOCH_RUN = {"max_steps": None, "max_length": 64, "warmup_ratio": 0.3, "warmup_steps": 0,
             "checkpoint_interval": 100, "report_every": 1}


def run(spec):
    lines = []
    result = train(spec, resume="fresh", log=lines.append)
    assert result.exit_code == 0, result.reason
    metrics = Path(spec.output_dir) / "metrics.jsonl"
    return [json.loads(x) for x in metrics.read_text().splitlines()], lines


def test_num_epochs_is_max_steps_counted_from_the_data(narrow_model, tiny_spec, tmp_path):
    # 22 records, batch 4: 22 // 4 = 5 full batches an epoch (the remainder sits out), so
    # by hand 2 epochs = 10 steps; warmup_ratio 0.3 -> 3 warmup steps either way.
    write_jsonl(tmp_path / "data" / "train.jsonl",
                [chat(f"question {i}", "answer " * (1 + i % 7)) for i in range(22)])
    write_jsonl(tmp_path / "data" / "valid.jsonl", [chat("q", "a b c")] * 4)
    runs = {"model": narrow_model, "data": tmp_path / "data"}
    by_epochs, lines = run(tiny_spec(EPOCH_RUN, runs, num_epochs=2))
    by_steps, _ = run(tiny_spec(EPOCH_RUN, runs, max_steps=10))
    assert any("num_epochs=2: 10 steps (5 per epoch" in m for m in lines)

    def view(records):
        return [(r["type"], r["step"], r.get("total_steps"), r.get("learning_rate"),
                 r.get("loss"), r.get("epoch"), r.get("val_loss"))
                for r in records if r["type"] in ("train", "eval")]

    assert view(by_epochs) == view(by_steps)
    train_records = [r for r in by_epochs if r["type"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 11))
    assert {r["total_steps"] for r in train_records} == {10}
    assert [r["epoch"] for r in train_records] == [0] * 5 + [1] * 5
    start = next(r for r in by_epochs if r["type"] == "start")
    assert start["info"]["total_steps"] == 10
