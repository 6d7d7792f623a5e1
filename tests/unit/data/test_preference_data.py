"""Preference records: parsing errors by file:line, completion-only targets checked
against the template's own rendering, keep_start truncation counts, paired batches that
split and shard without separating a pair, and the objective/data agreement."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_tune.config.spec import build_spec
from mlx_tune.data.batch import Batch, shard_rows
from mlx_tune.data.batching import pad_pairs
from mlx_tune.data.preflight import check_data
from mlx_tune.data.records import DataError, read_records
from mlx_tune.data.testing import tiny_tokenizer, write_jsonl
from mlx_tune.data.tokenize import PairCounts, make_pair

PAIR = {"prompt": "How do I make a tomato soup?", "chosen": "Roast tomatoes with garlic.",
        "rejected": "Mix the dry ingredients."}


def records(tmp_path, rows):
    return read_records(write_jsonl(tmp_path / "train.jsonl", rows))


@pytest.mark.parametrize("row,message", [
    ({"prompt": "hi", "chosen": "a"}, ":1: preference records need 'prompt', 'chosen' and "
                                      "'rejected'; 'rejected' is missing"),
    ({**PAIR, "chosen": "  "}, ":1: 'chosen' is empty: there is no completion to score"),
    ({**PAIR, "rejected": [{"role": "user", "content": "x"}]},
     ":1: 'rejected' must start with an assistant message, not 'user'"),
    ({**PAIR, "prompt": 3}, ":1: 'prompt' must be a string or a non-empty list"),
])
def test_bad_records_name_their_line(tmp_path, row, message):
    with pytest.raises(DataError) as e:
        records(tmp_path, [row])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_targets_are_the_completion_only(tmp_path):
    tok = tiny_tokenizer()
    conversational = {"prompt": [{"role": "system", "content": "You are a helpful cooking "
                                  "assistant."}, {"role": "user", "content": PAIR["prompt"]}],
                      "chosen": [{"role": "assistant", "content": PAIR["chosen"]}],
                      "rejected": [{"role": "assistant", "content": PAIR["rejected"]}]}
    for record in records(tmp_path, [PAIR, conversational]):
        pair = make_pair(record, tok, 512)
        for (ids, mask), text in ((pair.chosen, PAIR["chosen"]), (pair.rejected, PAIR["rejected"])):
            # The template's own rendering: the prompt with the assistant header, then the
            # completion and its end-of-turn token; the separator after it is not a target.
            prompt = tok.apply_chat_template(list(record.messages), tokenize=False,
                                             add_generation_prompt=True)
            assert tok.decode(ids[:len(tok.encode(prompt))]) == prompt
            assert tok.decode(ids[mask == 1]) == text + "<|im_end|>"


def test_keep_start_truncation_and_pairs_without_room_are_counted(tmp_path):
    tok = tiny_tokenizer()
    long_prompt = {**PAIR, "prompt": "The quick brown fox jumps over the lazy dog. " * 20}
    same = {**PAIR, "rejected": PAIR["chosen"]}
    rows = records(tmp_path, [PAIR, long_prompt, same])
    full = len(make_pair(rows[0], tok, 512).chosen[0])
    counts = PairCounts("train", full - 2)
    kept = [make_pair(r, tok, full - 2, counts) for r in rows]
    assert kept[1] is None and kept[0] is not None and len(kept[0].chosen[0]) == full - 2
    assert (counts.seen, counts.no_room, counts.identical) == (3, 1, 1)
    assert counts.truncated >= 1  # the first pair kept its start, cut to max_length
    message = counts.message()
    assert f"train.jsonl:2" in message and f"train.jsonl:3" in message
    assert "identical chosen and rejected" in message


def test_pairs_that_differ_only_beyond_max_length_are_dropped_and_counted(tmp_path):
    tok = tiny_tokenizer()
    looping = {**PAIR, "rejected": PAIR["chosen"] + " Roast tomatoes with garlic." * 3}
    rows = records(tmp_path, [PAIR, looping])
    # Cut just before the first token where they differ (one answer ends, the other goes
    # on), the two sides are the same tokens; one token more and they differ.
    whole = make_pair(rows[1], tok, 512)
    cut = int(np.argmax(whole.chosen[0] != whole.rejected[0][:len(whole.chosen[0])]))
    assert cut > 0
    counts = PairCounts("train", cut)
    assert make_pair(rows[0], tok, cut, counts) is not None
    assert make_pair(rows[1], tok, cut, counts) is None
    assert make_pair(rows[1], tok, cut + 1) is not None
    assert (counts.seen, counts.cut_identical, counts.identical) == (2, 1, 0)
    assert "differ only after max_length" in counts.message() and "train.jsonl:2" in counts.message()


def test_paired_batches_split_and_shard_by_pair():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 100, (8, 6)).astype(np.int32)  # 4 pairs: chosen 0-3, rejected 4-7
    batch = Batch(tokens, np.ones((8, 6), np.float32), paired=True,
                  ref_logps=np.arange(8, dtype=np.float32))
    assert batch.size == 4
    first, second = batch.split(2)
    assert first.paired and first.tokens.tolist() == tokens[[0, 1, 4, 5]].tolist()
    assert second.ref_logps.tolist() == [2.0, 3.0, 6.0, 7.0]
    mine = shard_rows(batch, 1, 3)  # pairs 0-1 / 2 / 3
    assert mine.tokens.tolist() == tokens[[2, 6]].tolist()
    with pytest.raises(ValueError, match="batch of 4 cannot be split into 3"):
        batch.split(3)


def test_pad_pairs_lays_out_chosen_then_rejected(tmp_path):
    tok = tiny_tokenizer()
    pairs = [make_pair(r, tok, 512) for r in records(tmp_path, [PAIR, {**PAIR, "chosen": "Blend."}])]
    batch = pad_pairs(pairs, tok.pad_token_id, 512)
    assert batch.paired and batch.tokens.shape[0] == 4
    for row, (ids, _) in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
        assert batch.tokens[row, :len(ids)].tolist() == ids.tolist()


def test_the_objective_and_the_data_must_agree(tmp_path):
    tok = tiny_tokenizer()
    write_jsonl(tmp_path / "pairs" / "train.jsonl", [PAIR] * 4)
    write_jsonl(tmp_path / "chats" / "train.jsonl",
                [{"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"}]}] * 4)
    with pytest.raises(DataError, match="objective 'dpo' needs preference records"):
        check_data(build_spec(overrides={"data": str(tmp_path / "chats"), "objective": "dpo"}),
                   tok, log=lambda m: None)
    with pytest.raises(DataError, match="set objective: dpo, orpo or simpo"):
        check_data(build_spec(overrides={"data": str(tmp_path / "pairs")}), tok,
                   log=lambda m: None)
    (report,) = check_data(build_spec(overrides={"data": str(tmp_path / "pairs"),
                                                 "objective": "orpo"}), tok, log=lambda m: None)
    assert report.kinds == {"preference"} and report.records == 4


def test_packing_is_refused_for_preferences():
    from mlx_tune.config.schema import SpecError
    with pytest.raises(SpecError, match="'packing' is for sft only"):
        build_spec(overrides={"objective": "dpo", "packing": True})
