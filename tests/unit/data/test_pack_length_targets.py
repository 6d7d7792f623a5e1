"""A pack_length shorter than the prompts must not train on nothing: an example is cut at
its row's length when it is tokenized, so one whose prompt fills the row is dropped and
counted (naming pack_length), and a dataset left with too few examples is refused before
the model loads, instead of a run that "finishes" with an all-zero adapter."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_tune.data import load_data
from mlx_tune.data.records import DataError
from mlx_tune.data.testing import chat, tiny_tokenizer, write_jsonl

LONG_PROMPT = "Tell me everything about " + "slow braised autumn vegetables " * 8


# Rows packed from examples of up to 256 tokens; validation batches as the Spec sets them.
PACKED = {"batch_size": 2, "max_length": 256, "packing": True, "val_batches": None}


def test_every_prompt_longer_than_a_row_is_refused_with_the_reason(tiny_spec, tmp_path):
    tok = tiny_tokenizer()
    prompt_tokens = len(tok.encode(LONG_PROMPT))
    write_jsonl(tmp_path / "train.jsonl", [chat(f"{LONG_PROMPT} {i}", "Roast them.")
                                           for i in range(8)])
    lines: list[str] = []
    with pytest.raises(DataError, match=r"0 usable training records, fewer than batch_size=2"):
        load_data(tiny_spec(PACKED, data=tmp_path, pack_length=prompt_tokens // 2), tok,
                  log=lines.append)
    assert any(f"pack_length={prompt_tokens // 2}" in line
               and "dropped 8 left with no target tokens" in line for line in lines)


def test_only_examples_with_targets_in_their_row_are_packed(tiny_spec, tmp_path):
    tok = tiny_tokenizer()
    rows = [chat(f"{LONG_PROMPT} {i}", "Roast them.") for i in range(6)]
    rows += [chat(f"short {i}", "Boil them. " * 3) for i in range(10)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    pack = len(tok.encode(LONG_PROMPT)) // 2
    data = load_data(tiny_spec(PACKED, data=tmp_path, pack_length=pack), tok, log=lambda m: None)
    batches = [data.train.next_batch() for _ in range(data.train.steps_per_epoch())]
    assert data.train_records == 10  # the six long-prompt examples were dropped at tokenization
    for b in batches:
        assert b.tokens.shape[1] == pack
        for mask, seg in zip(b.mask, b.segments):
            for k in range(1, int(seg.max()) + 1):
                assert mask[seg == k].sum() > 0  # every packed example has targets
    assert "short" in tok.decode(batches[0].tokens[0][batches[0].segments[0] == 1])
    assert np.all([b.mask.sum() > 0 for b in batches])
