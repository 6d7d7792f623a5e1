"""mlx_tune.data.tokenize: chat-template masks, completions, text, truncation."""

from __future__ import annotations

import re

import pytest

from mlx_tune.data import load_data
from mlx_tune.data.records import Record
from mlx_tune.data.testing import chat, tiny_tokenizer, write_jsonl
from mlx_tune.data.tokenize import encode_record, make_example
from mlx_tune.config.schema import Spec
from mlx_tune.config.spec import build_spec

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def spans(ids, mask):
    """Contiguous runs of target tokens, as index lists."""
    out, cur = [], []
    for i, m in enumerate(mask):
        if m:
            cur.append(ids[i])
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def conversation():
    return (
        {"role": "system", "content": "You are a helpful cooking assistant."},
        {"role": "user", "content": "Create a recipe for pancakes."},
        {"role": "assistant", "content": "Mix flour, eggs and milk.\nCook on a hot pan."},
        {"role": "user", "content": "And soup?"},
        {"role": "assistant", "content": "Roast tomatoes with garlic, then blend them."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome!"},
    )


def test_chat_mask_covers_exactly_assistant_turns(tok):
    rec = Record(1, "chat", messages=conversation())
    ids, mask = encode_record(rec, tok, mask_prompt=True)
    assert len(ids) == len(mask) and mask[0] == 0
    full = tok.apply_chat_template(list(rec.messages), tokenize=False)
    assert tok.decode(ids) == full
    answers = [m["content"] + EOT for m in rec.messages if m["role"] == "assistant"]
    assert [tok.decode(s) for s in spans(ids, mask)] == answers


def test_mask_with_template_without_separator(tok):
    # A Mistral-like template: the answer is followed directly by the end-of-turn token and
    # the next turn, with no newline; prompts rendered by prefix still give exact spans.
    other = tiny_tokenizer.__wrapped__()
    other.chat_template = (
        "<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}")
    rec = Record(1, "chat", messages=conversation()[1:5])
    ids, mask = encode_record(rec, other, mask_prompt=True)
    assert [other.decode(s) for s in spans(ids, mask)] == [
        conversation()[2]["content"] + EOT, conversation()[4]["content"] + EOT]


def test_completions_go_through_chat_template(tok):
    rec = Record(1, "completions", messages=({"role": "user", "content": "Soup?"},
                                              {"role": "assistant", "content": "Blend it."}))
    ids, mask = encode_record(rec, tok, mask_prompt=True)
    assert tok.decode(ids) == "<|im_start|>user\nSoup?<|im_end|>\n<|im_start|>assistant\nBlend it.<|im_end|>\n"
    assert [tok.decode(s) for s in spans(ids, mask)] == ["Blend it." + EOT]


def test_mask_prompt_false_trains_every_token_but_first(tok):
    rec = Record(1, "chat", messages=conversation())
    ids, mask = encode_record(rec, tok, mask_prompt=False)
    assert mask == [0] + [1] * (len(ids) - 1)


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_text_is_never_masked_and_ends_with_eos(tok, mask_prompt):
    rec = Record(1, "text", text="The quick brown fox.")
    ids, mask = encode_record(rec, tok, mask_prompt=mask_prompt)
    assert ids == tok("The quick brown fox.")["input_ids"] + [tok.eos_token_id]
    assert mask == [0] + [1] * (len(ids) - 1)


def test_truncation_one_summary_warning(tmp_path, tok):
    short = [chat(f"dish {i}", "Cook.") for i in range(6)]
    long = [chat(f"dish {i}", "Mix flour and eggs. " * (5 + i)) for i in range(4)]
    drop = [chat("Create a recipe for pancakes with flour " * 6, "Yes.")]  # prompt > max
    write_jsonl(tmp_path / "train.jsonl", short + long + drop)
    max_length = 48
    lengths = [len(encode_record(Record(1, "chat", messages=tuple(r["messages"])), tok, True)[0])
               for r in short + long + drop]
    over = [n for n in lengths if n > max_length]
    logs = []
    bundle = load_data(Spec(data=str(tmp_path), max_length=max_length, batch_size=2,
                            prefetch=0), tok, log=logs.append)
    warnings = [m for m in logs if "truncated" in m]
    assert warnings == [f"truncated {len(over)} of 11 train sequences to max_length=48 tokens "
                        f"(longest {max(over)}); dropped 1 left with no target tokens"]
    assert bundle.train_records == 10
    for _ in range(10):
        batch = bundle.train.next_batch()
        assert batch.tokens.shape[1] <= max_length


def test_truncation_keeps_first_tokens(tok):
    rec = Record(1, "chat", messages=conversation())
    ids, mask = encode_record(rec, tok, True)
    ex = make_example(rec, tok, True, 40)
    assert ex.ids.tolist() == ids[:40] and ex.mask.tolist() == mask[:40]


def test_augmented_user_turn_is_masked(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [chat(f"dish {i}", "Cook it.") for i in range(4)])
    spec = build_spec(overrides={"data": str(tmp_path), "batch_size": 2, "prefetch": 0,
                                 "augmentation": {"enabled": True, "prob": 1.0,
                                                  "templates": ["Recipe for: {text}"]}})
    bundle = load_data(spec, tok, log=lambda m: None)
    batch = bundle.train.next_batch()
    for row, m in zip(batch.tokens, batch.mask):
        text = tok.decode(row)
        assert re.search(r"user\nRecipe for: dish \d<\|im_end\|>", text)
        assert [tok.decode(s) for s in spans(list(row), list(m))] == ["Cook it." + EOT]


def test_template_failure_names_the_record(tmp_path):
    strict = tiny_tokenizer.__wrapped__()
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    path = write_jsonl(tmp_path / "train.jsonl", [
        chat("a", "b"), {"messages": [{"role": "system", "content": "S"}, *chat("a", "b")["messages"]]}])
    with pytest.raises(Exception) as err:
        load_data(Spec(data=str(tmp_path), batch_size=1), strict, log=lambda m: None)
    assert str(err.value).startswith(f"{path}:2: the chat template cannot render this record")
    assert "System role not supported" in str(err.value)
    strict.chat_template = None
    with pytest.raises(Exception, match=rf"{path}:1: the tokenizer has no chat template"):
        load_data(Spec(data=str(tmp_path), batch_size=1), strict, log=lambda m: None)


class TokenizerWrapper:
    """Stands in for mlx_lm's wrapper (importing mlx_lm takes seconds): not callable."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_mlx_lm_tokenizer_wrapper_is_accepted(tmp_path, tok):
    wrapper = TokenizerWrapper(tok)
    write_jsonl(tmp_path / "train.jsonl", [chat(f"dish {i}", "Cook.") for i in range(4)])
    spec = Spec(data=str(tmp_path), batch_size=2, prefetch=0)
    a = load_data(spec, wrapper, log=lambda m: None).train.next_batch()
    b = load_data(spec, tok, log=lambda m: None).train.next_batch()
    assert (a.tokens == b.tokens).all() and (a.mask == b.mask).all()
