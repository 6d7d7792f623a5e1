"""The shipped data (data/recipes, data/samples) and the embedded tiny model's tokenizer.

Skipped where the assets are absent; the in-memory tokenizer stands in for the model's
when only the data exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mlx_tune.data import load_data, load_eval_file
from mlx_tune.data.filters import epoch_filter
from mlx_tune.data.records import Record, read_records
from mlx_tune.data.testing import tiny_tokenizer
from mlx_tune.data.tokenize import encode_record

ROOT = Path(__file__).resolve().parents[3]
RECIPES = ROOT / "data" / "recipes"
SAMPLES = ROOT / "data" / "samples"
# MLX_TUNE_TEST_MODEL points these tests at another model directory (e.g. a fresh build).
MODEL = Path(os.environ.get("MLX_TUNE_TEST_MODEL", ROOT / "mlx_tune" / "assets" / "tiny-mistral"))

needs_recipes = pytest.mark.skipif(not (RECIPES / "train.jsonl").is_file(),
                                   reason="data/recipes not shipped yet")
needs_model = pytest.mark.skipif(not (MODEL / "tokenizer_config.json").is_file(),
                                 reason="mlx_tune/assets/tiny-mistral not built yet")


@pytest.fixture(scope="module")
def model_tok():
    # The class its tokenizer_config names; AutoTokenizer's imports alone take seconds.
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(MODEL))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def quiet(_):
    pass


# The data layer alone: validation batches as the Spec sets them.
RECIPE_BATCHES = {"val_batches": None}


def spans(ids, mask):
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


@needs_recipes
def test_recipes_curriculum_counts(tiny_spec):
    raw = [json.loads(line) for line in open(RECIPES / "train.jsonl")]
    easy = [r for r in raw if r["difficulty"] <= 1]
    good = [r for r in easy if r["quality"] >= 0.5]
    spec = tiny_spec(RECIPE_BATCHES, data=RECIPES,
                     curriculum=[{"until_epoch": 1, "max_difficulty": 1}],
                     quality={"start": 0.5, "end": 0.8, "ramp_epochs": 2})
    f = epoch_filter(spec.curriculum, spec.quality, 0)
    kept = [r for r in read_records(RECIPES / "train.jsonl") if f.keeps(r, 0)]
    assert len(kept) == len(good) and all(r.difficulty <= 1 for r in kept)
    assert f.message() == (f"epoch 0: curriculum stage 1 keeps {len(easy)}/{len(raw)} records; "
                           f"quality >= 0.5 keeps {len(good)}")


@needs_recipes
def test_recipes_streaming_and_validation(tiny_spec, tok):
    logs = []
    bundle = load_data(tiny_spec(RECIPE_BATCHES, data=RECIPES, streaming=True,
                                 shuffle_buffer=200), tok, log=logs.append)
    assert bundle.train_records == 1500
    for _ in range(3):
        assert bundle.train.next_batch().tokens.shape[1] in (32, 64, 96, 128)
    valid = bundle.valid.batches()
    assert len(valid) == 38 and bundle.valid.first_prompts(3)[0][-1]["role"] == "user"
    assert sum(m.startswith("truncated ") and " valid sequences " in m for m in logs) == 1
    bundle.close()


@pytest.mark.skipif(not (SAMPLES / "completions" / "train.jsonl").is_file(),
                    reason="data/samples not shipped yet")
@pytest.mark.parametrize("kind", ["completions", "text"])
def test_sample_formats_load(tiny_spec, tok, kind):
    bundle = load_data(tiny_spec(RECIPE_BATCHES, data=SAMPLES / kind), tok, log=quiet)
    batch = bundle.train.next_batch()
    assert batch.size == 4 and batch.n_targets > 0
    assert bundle.valid is not None and bundle.valid.batches()


@needs_model
@needs_recipes
def test_model_tokenizer_masks_on_recipes(model_tok):
    eot = "<|im_end|>"
    for record in read_records(RECIPES / "valid.jsonl")[:40]:
        ids, mask = encode_record(record, model_tok, mask_prompt=True)
        answers = [m["content"] + eot for m in record.messages if m["role"] == "assistant"]
        assert [model_tok.decode(s) for s in spans(ids, mask)] == answers


@needs_model
def test_model_tokenizer_on_every_format(model_tok):
    chat = Record(1, "completions", messages=({"role": "user", "content": "Soup?"},
                                               {"role": "assistant", "content": "Blend it."}))
    ids, mask = encode_record(chat, model_tok, mask_prompt=True)
    assert [model_tok.decode(s) for s in spans(ids, mask)] == ["Blend it.<|im_end|>"]
    ids, mask = encode_record(Record(1, "text", text="Boil the pasta."), model_tok, True)
    assert ids[-1] == model_tok.eos_token_id and mask == [0] + [1] * (len(ids) - 1)


@needs_model
@needs_recipes
def test_model_tokenizer_test_file(tiny_spec, model_tok):
    spec = tiny_spec(RECIPE_BATCHES, data=RECIPES, max_length=256)
    batches = load_eval_file(RECIPES / "test.jsonl", spec, model_tok, log=quiet)
    assert sum(b.size for b in batches) == len(read_records(RECIPES / "test.jsonl"))
    assert all(b.tokens.shape[1] <= 256 for b in batches)
