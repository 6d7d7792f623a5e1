"""Unpaired (KTO) records: parsing errors by file:line, completion-only targets checked
against the template's own rendering, KL rows fixed in file order (each prompt with the
next record's completion), keep_start and no-room counts, the label-class warning, batches
of 2n rows whose splits keep each example with its KL row and its label, Hugging Face
datasets through data_fields, and the objective/data agreement."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_tune.config.schema import SpecError
from mlx_tune.config.spec import build_spec
from mlx_tune.data import load_data
from mlx_tune.data.batch import Batch, shard_rows
from mlx_tune.data.preflight import check_data
from mlx_tune.data.records import DataError, read_records
from mlx_tune.data.testing import tiny_tokenizer, write_jsonl
from mlx_tune.data.unpaired import UnpairedCounts, kl_donors, make_unpaired, tokenize_unpaired

GOOD = {"prompt": "How do I make a tomato soup?", "completion": "Roast tomatoes with garlic.",
        "label": True}
BAD = {"prompt": "Create a recipe for pancakes.", "completion": "Mix the dry ingredients.",
       "label": False}


def quiet(_):
    pass


def records(tmp_path, rows, name="train.jsonl"):
    return read_records(write_jsonl(tmp_path / name, rows))


@pytest.mark.parametrize("row,message", [
    ({"prompt": "hi", "label": True}, ":2: unpaired records need 'prompt', 'completion' and "
                                      "'label'; 'completion' is missing"),
    ({"prompt": "hi", "completion": "a"}, ":2: unpaired records need 'prompt', 'completion' "
                                          "and 'label'; 'label' is missing"),
    ({**GOOD, "label": "yes"}, ":2: 'label' must be true (a desirable completion) or false "
                               "(an undesirable one), got \"yes\""),
    ({**GOOD, "label": 1}, ":2: 'label' must be true"),
    ({**GOOD, "completion": " "}, ":2: 'completion' is empty: there is no completion to score"),
    ({**GOOD, "completion": [{"role": "user", "content": "x"}]},
     ":2: 'completion' must start with an assistant message, not 'user'"),
    ({**GOOD, "prompt": []}, ":2: 'prompt' must be a string or a non-empty list"),
])
def test_bad_records_name_their_line(tmp_path, row, message):
    with pytest.raises(DataError) as e:
        records(tmp_path, [GOOD, row])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_rows_score_the_completion_and_kl_rows_borrow_the_next_completion(tmp_path):
    tok = tiny_tokenizer()
    conversational = {"prompt": [{"role": "system", "content": "You are a helpful cooking "
                                  "assistant."}, {"role": "user", "content": "Soup?"}],
                      "completion": [{"role": "assistant", "content": "Blend them."}],
                      "label": False}
    rows = [GOOD, BAD, conversational]
    recs = records(tmp_path, rows)
    assert [r.kind for r in recs] == ["unpaired"] * 3 and [r.label for r in recs] == \
        [True, False, False]
    examples = tokenize_unpaired(recs, tok, 512, "train", quiet)
    texts = [r["completion"] if isinstance(r["completion"], str)
             else r["completion"][0]["content"] for r in rows]
    for i, (ex, record) in enumerate(zip(examples, recs)):
        prompt = tok.apply_chat_template(list(record.messages), tokenize=False,
                                         add_generation_prompt=True)
        for (ids, mask), text in ((ex.row, texts[i]), (ex.kl_row, texts[(i + 1) % 3])):
            # The template's own rendering: the prompt with the assistant header, then the
            # completion and its end-of-turn token (the separator after it is no target).
            assert tok.decode(ids[:len(tok.encode(prompt))]) == prompt
            assert tok.decode(ids[mask == 1]) == text + "<|im_end|>"
    # Donors are fixed by file order alone: the same rows on every read.
    assert [d.line for d in kl_donors(recs)] == [2, 3, 1]
    # Both answers of a prompt side by side: a KL row still borrows another prompt's answer.
    both = records(tmp_path, [GOOD, {**GOOD, "completion": "Burn it.", "label": False},
                              BAD, {**BAD, "label": True}], "both.jsonl")
    assert [d.line for d in kl_donors(both)] == [3, 3, 1, 1]
    assert [d.line for d in kl_donors(both[:1] * 3)] == [1, 1, 1]  # no other prompt
    again = tokenize_unpaired(records(tmp_path, rows, "again.jsonl"), tok, 512, "train", quiet)
    assert all(np.array_equal(a.kl_row[0], b.kl_row[0]) for a, b in zip(examples, again))


def test_keep_start_truncation_no_room_and_label_class_counts(tmp_path):
    tok = tiny_tokenizer()
    long_prompt = {**GOOD, "prompt": "The quick brown fox jumps over the lazy dog. " * 20}
    recs = records(tmp_path, [GOOD, long_prompt, GOOD])
    full = len(make_unpaired(recs[0], recs[0].completion, tok, 512).row[0])
    counts = UnpairedCounts("train", full - 2)
    kept = [make_unpaired(r, r.completion, tok, full - 2, counts) for r in recs]
    assert kept[1] is None and len(kept[0].row[0]) == full - 2
    assert (counts.seen, counts.no_room, counts.truncated) == (3, 1, 2)
    assert "train.jsonl:2" in counts.message() and "keeping their start" in counts.message()
    assert "all 3 train examples are desirable" in counts.label_warning()
    counts.undesirable += 1
    assert counts.label_warning() is None


def test_batches_of_2n_rows_split_and_shard_by_example(tmp_path):
    tok = tiny_tokenizer()
    from mlx_tune.data.batching import pad_unpaired
    examples = tokenize_unpaired(records(tmp_path, [GOOD, BAD, BAD, GOOD]), tok, 512, "t", quiet)
    batch = pad_unpaired(examples, tok.pad_token_id, 512)
    assert batch.paired and batch.size == 4 and batch.tokens.shape[0] == 8
    assert batch.labels.tolist() == [1.0, 0.0, 0.0, 1.0] and batch.labels.dtype == np.float32
    for row, (ids, _) in enumerate([e.row for e in examples] + [e.kl_row for e in examples]):
        assert batch.tokens[row, :len(ids)].tolist() == ids.tolist()
    assert set(batch.arrays()) == {"tokens", "mask", "labels"}
    batch = Batch(batch.tokens, batch.mask, paired=True, labels=batch.labels,
                  ref_logps=np.arange(8, dtype=np.float32))
    first, second = batch.split(2)
    assert first.tokens.tolist() == batch.tokens[[0, 1, 4, 5]].tolist()
    assert first.labels.tolist() == [1.0, 0.0] and second.labels.tolist() == [0.0, 1.0]
    assert second.ref_logps.tolist() == [2.0, 3.0, 6.0, 7.0]
    mine = shard_rows(batch, 1, 3)  # examples 0-1 / 2 / 3
    assert mine.tokens.tolist() == batch.tokens[[2, 6]].tolist() and mine.labels.tolist() == [0.0]


def kto_dir(tmp_path, train, valid=None):
    d = tmp_path / "kto"
    write_jsonl(d / "train.jsonl", train)
    if valid is not None:
        write_jsonl(d / "valid.jsonl", valid)
    return d


def test_load_data_gives_kto_batches_for_training_and_validation(tmp_path):
    tok = tiny_tokenizer()
    train = [{**(GOOD if i % 3 else BAD), "prompt": f"Recipe {i}?"} for i in range(8)]
    d = kto_dir(tmp_path, train, [GOOD, BAD, BAD])
    spec = build_spec(overrides={"data": str(d), "objective": "kto", "batch_size": 2,
                                 "max_length": 64, "val_batches": -1})
    bundle = load_data(spec, tok, log=quiet)
    try:
        batch = bundle.train.next_batch()
        assert batch.tokens.shape[0] == 4 and batch.labels.shape == (2,)
        lines = {tok.decode(batch.tokens[i][batch.mask[i] == 0]).split("Recipe ")[1][0]
                 for i in range(4)}
        assert len(lines) == 2  # each example's KL row shares its prompt
        valid = bundle.valid.batches()
        # No all-padding examples: the last batch holds the one example left.
        assert sorted(b.size for b in valid) == [1, 2]
        assert sorted(float(x) for b in valid for x in b.labels) == [0.0, 0.0, 1.0]
    finally:
        bundle.close()


def test_preflight_agreement_label_warning_and_streaming_refusal(tmp_path):
    tok = tiny_tokenizer()
    only_good = kto_dir(tmp_path, [GOOD] * 4)
    lines = []
    check_data(build_spec(overrides={"data": str(only_good), "objective": "kto"}), tok,
               log=lines.append)
    assert any("all 4 train examples are desirable" in line for line in lines)
    pairs = tmp_path / "pairs"
    write_jsonl(pairs / "train.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError, match="objective 'kto' needs unpaired records"):
        check_data(build_spec(overrides={"data": str(pairs), "objective": "kto"}), tok,
                   log=quiet)
    with pytest.raises(DataError, match="set objective: kto"):
        check_data(build_spec(overrides={"data": str(only_good)}), tok, log=quiet)
    with pytest.raises(SpecError, match="turn streaming off"):
        build_spec(overrides={"objective": "kto", "streaming": True})
    with pytest.raises(SpecError, match="'packing' is for sft only"):
        build_spec(overrides={"objective": "kto", "packing": True})


def test_a_hugging_face_dataset_with_mapped_columns_gives_the_jsonl_batches(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = tiny_tokenizer()
    train = [{**(GOOD if i % 2 else BAD), "prompt": f"Recipe {i}?"} for i in range(6)]
    saved = tmp_path / "saved"
    renamed = [{"question": r["prompt"], "answer": r["completion"], "ok": r["label"]}
               for r in train]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(renamed)}).save_to_disk(str(saved))
    common = {"objective": "kto", "batch_size": 2, "max_length": 64, "val_batches": -1,
              "val_split": 0.3}
    fields = {"prompt": "question", "completion": "answer", "label": "ok"}
    got = load_data(build_spec(overrides={"data": str(saved), "data_fields": fields, **common}),
                    tok, log=quiet)
    want = load_data(build_spec(overrides={"data": str(kto_dir(tmp_path, train)), **common}),
                     tok, log=quiet)
    try:
        for a, b in [(got.train.next_batch(), want.train.next_batch()) for _ in range(3)] + \
                list(zip(got.valid.batches(), want.valid.batches())):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.labels, b.labels)
    finally:
        got.close()
        want.close()
