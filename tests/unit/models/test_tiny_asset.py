"""Fast checks of the embedded tiny model and the shipped recipe dataset.

Nothing here rebuilds the model (that takes minutes; see
``scripts/build_tiny_model.py --check``).  Dataset regeneration is cheap, so it
*is* checked byte-for-byte against the committed files.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
ASSET = REPO / "mlx_tune" / "assets" / "tiny-mistral"
DATA = REPO / "data"

ASSET_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
    "SHA256SUMS",
]

# Ids fixed by scripts/build_tiny_model.py (SPECIAL_TOKENS order).
SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<|im_start|>": 4, "<|im_end|>": 5}

DATASET_FILES = [
    "recipes/train.jsonl",
    "recipes/valid.jsonl",
    "recipes/test.jsonl",
    "corpus/pretrain.txt",
    "samples/completions/train.jsonl",
    "samples/completions/valid.jsonl",
    "samples/text/train.jsonl",
    "samples/text/valid.jsonl",
    *(f"{kind}/{split}.jsonl" for kind in ("preference", "kto") for split in ("train", "valid", "test")),
]


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(ASSET / "tokenizer.json"))


# ---------------------------------------------------------------------------
# Asset
# ---------------------------------------------------------------------------


def test_asset_has_expected_files():
    missing = [f for f in ASSET_FILES if not (ASSET / f).is_file()]
    assert not missing, f"missing from {ASSET}: {missing}"
    size = (ASSET / "model.safetensors").stat().st_size
    assert 1_000_000 < size < 13_000_000, size


def test_asset_matches_sha256sums():
    sums = {}
    for line in (ASSET / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name] = digest
    assert set(sums) == set(ASSET_FILES) - {"SHA256SUMS"}
    for name, digest in sums.items():
        assert hashlib.sha256((ASSET / name).read_bytes()).hexdigest() == digest, name


def test_config_is_mistral():
    cfg = json.loads((ASSET / "config.json").read_text())
    assert cfg["model_type"] == "mistral"
    assert cfg["architectures"] == ["MistralForCausalLM"]
    assert cfg["tie_word_embeddings"] is False
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"]
    assert cfg["eos_token_id"] == SPECIAL_IDS["<|im_end|>"]
    assert cfg["bos_token_id"] == SPECIAL_IDS["<s>"]
    assert cfg["pad_token_id"] == SPECIAL_IDS["<pad>"]


def test_weights_have_hf_mistral_names():
    safetensors = pytest.importorskip("safetensors")
    cfg = json.loads((ASSET / "config.json").read_text())
    with safetensors.safe_open(str(ASSET / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        emb = f.get_slice("model.embed_tokens.weight").get_shape()
        dtype = f.get_slice("lm_head.weight").get_dtype()
    assert emb == [cfg["vocab_size"], cfg["hidden_size"]]
    assert dtype == "F32"
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expected |= {p + s + ".weight" for s in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
    assert keys == expected


def test_tokenizer_special_tokens_are_single_ids(tokenizer):
    for tok, i in SPECIAL_IDS.items():
        assert tokenizer.token_to_id(tok) == i
    enc = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n")
    assert enc.ids[0] == SPECIAL_IDS["<|im_start|>"]
    assert SPECIAL_IDS["<|im_end|>"] in enc.ids
    cfg = json.loads((ASSET / "config.json").read_text())
    assert tokenizer.get_vocab_size() == cfg["vocab_size"]


@pytest.mark.parametrize("text", [
    "Bake the banana bread at 170°C for 55 minutes.",
    "Ingredients (serves 4):\n- 400 g spaghetti\n\nSteps:\n1. Boil the water.",
    "  leading spaces, tabs\tand ünïcödé 🍝 survive  ",
    "",
])
def test_tokenizer_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_tokenizer_config_and_chat_template():
    tc = json.loads((ASSET / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tc["eos_token"] == "<|im_end|>"
    assert tc["pad_token"] and tc["bos_token"] == "<s>" and tc["unk_token"] == "<unk>"
    # transformers 5 reads chat_template.jinja; older versions the config key.
    assert (ASSET / "chat_template.jinja").read_text() == tc["chat_template"]
    assert "add_generation_prompt" in tc["chat_template"]


def test_chat_template_renders():
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string((ASSET / "chat_template.jinja").read_text())
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    full = template.render(messages=msgs, add_generation_prompt=False)
    assert full == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    prompt = template.render(messages=msgs[:1], add_generation_prompt=True)
    # Prompt masking relies on the prompt being a prefix of the full rendering.
    assert full.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("split,lo,hi", [("train", 1000, 3000), ("valid", 100, 300), ("test", 50, 300)])
def test_recipe_splits_parse(split, lo, hi):
    recs = _read_jsonl(DATA / "recipes" / f"{split}.jsonl")
    assert lo <= len(recs) <= hi
    for r in recs:
        assert set(r) == {"messages", "quality", "difficulty"}
        assert 0.0 <= r["quality"] <= 1.0
        assert r["difficulty"] in (1, 2, 3)
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "assistant"
        assert set(roles) <= {"system", "user", "assistant"}
        assert "system" not in roles[1:]
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])


def test_recipe_dataset_has_spread():
    recs = _read_jsonl(DATA / "recipes" / "train.jsonl")
    qualities = [r["quality"] for r in recs]
    assert min(qualities) < 0.3 and max(qualities) > 0.9
    assert 0.1 < sum(q < 0.6 for q in qualities) / len(recs) < 0.4
    assert {r["difficulty"] for r in recs} == {1, 2, 3}
    assert any(sum(m["role"] == "user" for m in r["messages"]) == 2 for r in recs)
    assert any(r["messages"][0]["role"] == "system" for r in recs)
    assert any(r["messages"][0]["role"] == "user" for r in recs)
    # difficulty correlates with length
    by_d = {d: [sum(len(m["content"]) for m in r["messages"]) for r in recs if r["difficulty"] == d] for d in (1, 2, 3)}
    means = [sum(v) / len(v) for v in by_d.values()]
    assert means[0] < means[1] < means[2]


def test_recipe_dataset_has_long_records(tokenizer):
    """Some conversations run to 400+ tokens so max_seq_length truncation is exercised."""
    recs = _read_jsonl(DATA / "recipes" / "train.jsonl")
    lengths = [
        len(tokenizer.encode("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                                     for m in r["messages"])).ids)
        for r in recs
    ]
    assert sum(n >= 400 for n in lengths) >= 20
    assert max(lengths) < 2048  # but nothing beyond the model's context


def test_corpus_is_plain_text():
    text = (DATA / "corpus" / "pretrain.txt").read_text(encoding="utf-8")
    assert 200_000 < len(text) < 5_000_000
    for marker in ("<|im_start|>", "<|im_end|>", "<s>", "</s>", '"messages"'):
        assert marker not in text


def test_sample_files_parse():
    for split in ("train", "valid"):
        comp = _read_jsonl(DATA / "samples" / "completions" / f"{split}.jsonl")
        assert comp and all(set(r) == {"prompt", "completion"} for r in comp)
        text = _read_jsonl(DATA / "samples" / "text" / f"{split}.jsonl")
        assert text and all(set(r) == {"text"} for r in text)
    assert len(_read_jsonl(DATA / "samples" / "completions" / "train.jsonl")) == 64
    assert len(_read_jsonl(DATA / "samples" / "text" / "train.jsonl")) == 64


def test_preference_files_pair_a_faithful_answer_with_a_different_one():
    for split, n in (("train", 400), ("valid", 48), ("test", 48)):
        pairs = _read_jsonl(DATA / "preference" / f"{split}.jsonl")
        assert len(pairs) == n and all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
        assert all(p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant" for p in pairs)
        assert all(p["chosen"] != p["rejected"] for p in pairs)
        kto = _read_jsonl(DATA / "kto" / f"{split}.jsonl")
        assert [r["prompt"] for r in kto] == [p["prompt"] for p in pairs]
        assert sum(r["label"] for r in kto) == n // 2
        assert all(r["completion"] == (p["chosen"] if r["label"] else p["rejected"])
                   for r, p in zip(kto, pairs))


def test_dataset_regenerates_byte_identical(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_dataset.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for rel in DATASET_FILES:
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), f"{rel} differs from regeneration"
