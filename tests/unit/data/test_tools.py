"""Tool-calling chats (mlx-lm's record format), ShareGPT records, and their validation."""

from __future__ import annotations

import json

import pytest

from mlx_tune.config.spec import build_spec
from mlx_tune.data.preflight import check_data
from mlx_tune.data.records import DataError, parse_line, read_records
from mlx_tune.data.testing import tiny_tokenizer, write_jsonl
from mlx_tune.data.tokenize import encode_record

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object",
                                       "properties": {"zone": {"type": "string"}}}}}


def tool_chat() -> dict:
    """Two rounds, each with a tool call; the first call's arguments as a JSON string."""
    return {"tools": [WEATHER, TIME], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "12C, rain"},
        {"role": "assistant", "content": "12 degrees and rain."},
        {"role": "user", "content": "And the time there?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c2", "type": "function",
             "function": {"name": "get_time", "arguments": {"zone": "Europe/Oslo"}}}]},
        {"role": "tool", "tool_call_id": "c2", "name": "get_time", "content": "14:05"},
        {"role": "assistant", "content": "It is 14:05."}]}


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(tiny_model))


def target_spans(tok, ids, mask) -> list[str]:
    out, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out + ([tok.decode(cur)] if cur else [])


def test_masks_are_exactly_the_assistant_turns_with_their_tool_calls(model_tok):
    record = parse_line(json.dumps(tool_chat()), "t.jsonl", 1)
    ids, mask = encode_record(record, model_tok, mask_prompt=True)
    # The whole conversation, as the model's template renders it with the tools.
    assert model_tok.decode(ids) == model_tok.apply_chat_template(
        list(record.messages), tools=list(record.tools), tokenize=False)
    # Targets written out by hand in Hermes-2-Pro's format: each assistant turn, its calls
    # and its end-of-turn token; nothing of the system, user or tool turns.
    eot = "<|im_end|>"
    assert target_spans(model_tok, ids, mask) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' + eot,
        "12 degrees and rain." + eot,
        'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Oslo"}}'
        "\n</tool_call>" + eot,
        "It is 14:05." + eot]
    prompt = model_tok.decode([t for t, m in zip(ids, mask) if not m])
    for text in ("get_weather", "Be brief.", "Weather in Oslo?", "<tool_response>\n12C, rain",
                 "14:05\n</tool_response>", "<|im_start|>assistant\n"):
        assert text in prompt


def test_parallel_calls_and_grouped_results(model_tok):
    rec = tool_chat()
    calls = rec["messages"][2]["tool_calls"] + rec["messages"][6]["tool_calls"]
    rec["messages"] = [rec["messages"][1], {"role": "assistant", "content": "", "tool_calls": calls},
                       rec["messages"][3], rec["messages"][7],
                       {"role": "assistant", "content": "Rainy, 14:05."}]
    record = parse_line(json.dumps(rec), "t.jsonl", 1)
    ids, mask = encode_record(record, model_tok, mask_prompt=True)
    spans = target_spans(model_tok, ids, mask)
    assert len(spans) == 2 and spans[0].count("<tool_call>") == 2
    text = model_tok.decode(ids)
    assert "<|im_start|>tool\n<tool_response>\n12C, rain\n</tool_response>\n<tool_response>" \
           "\n14:05\n</tool_response><|im_end|>" in text


def test_without_tools_the_template_is_plain_chatml(model_tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert model_tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments=5),
     "train.jsonl:2: message 2 tool_calls[0]: 'arguments' must be a JSON object or a string"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="[1, 2]"),
     "train.jsonl:2: message 2 tool_calls[0]: 'arguments' must be a JSON object or a string"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Oslo}"),
     "train.jsonl:2: message 2 tool_calls[0]: 'arguments' must be a JSON object"),
    (lambda r: r["messages"].pop(2),
     "train.jsonl:2: message 2 is a tool result without a preceding assistant tool call"),
    (lambda r: r["messages"][3].update(tool_call_id="nope"),
     "train.jsonl:2: message 3: tool_call_id 'nope' matches no call"),
    (lambda r: r.update(tools="get_weather"),
     "train.jsonl:2: 'tools' must be a list of function specs"),
    (lambda r: r.update(tools=[{"description": "no name"}]),
     "train.jsonl:2: tools[0]: 'tools' must be a list of function specs"),
    (lambda r: r["messages"][3].update(content={"temp": 12}),
     "train.jsonl:2: message 3 (tool): 'content' must be a string (serialise"),
    (lambda r: r["messages"][1].update(role="function"),
     "train.jsonl:2: message 1 has role 'function'; expected one of system, user, assistant, tool"),
])
def test_each_validation_error_names_file_and_line(tmp_path, mutate, message):
    bad = tool_chat()
    mutate(bad)
    write_jsonl(tmp_path / "train.jsonl", [tool_chat(), bad])
    with pytest.raises(DataError) as e:
        read_records(tmp_path / "train.jsonl")
    assert str(e.value).startswith(f"{tmp_path / 'train.jsonl'}:2: ") and \
        message.split(":", 2)[2].strip() in str(e.value)


def test_a_template_that_cannot_render_tools_is_refused_before_the_model_loads(tmp_path):
    # The in-memory tokenizer's template is ChatML without tools: it would drop them.
    write_jsonl(tmp_path / "train.jsonl", [tool_chat()])
    tok = tiny_tokenizer.__wrapped__()
    tok.name_or_path = "example/chatml-without-tools"
    spec = build_spec(overrides={"data": str(tmp_path)})
    with pytest.raises(DataError, match=r"train.jsonl:1: the record uses tools, but the chat "
                       r"template of example/chatml-without-tools cannot render them \(it "
                       r"drops tool definitions, tool calls, call arguments.*Hermes-2-Pro"):
        check_data(spec, tok, log=lambda m: None)


def test_sharegpt_records_are_read_as_messages_and_noted(tmp_path, model_tok):
    share = {"conversations": [{"from": "system", "value": "Be brief."},
                               {"from": "human", "value": "Soup?"},
                               {"from": "gpt", "value": "Blend tomatoes."}], "quality": 0.5}
    plain = {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Soup?"},
                          {"role": "assistant", "content": "Blend tomatoes."}], "quality": 0.5}
    write_jsonl(tmp_path / "train.jsonl", [share, share])
    a, b = read_records(tmp_path / "train.jsonl")[0], parse_line(json.dumps(plain), "x", 1)
    assert a == b and a.dialect == "sharegpt"
    notes = []
    check_data(build_spec(overrides={"data": str(tmp_path)}), model_tok, log=notes.append)
    assert notes == [f"{tmp_path / 'train.jsonl'}: 2 ShareGPT records ('conversations' with "
                     "from/value) read as chat messages: human -> user, gpt -> assistant, "
                     "system -> system, tool -> tool"]
    bad = {"conversations": [{"from": "bot", "value": "x"}]}
    write_jsonl(tmp_path / "train.jsonl", [share, bad])
    with pytest.raises(DataError, match=r"train.jsonl:2: conversations\[0\] has from='bot'"):
        read_records(tmp_path / "train.jsonl")


def test_shipped_tool_data_is_valid_and_noted(model_tok):
    from pathlib import Path
    data = Path(__file__).resolve().parents[3] / "data" / "tools"
    notes = []
    reports = check_data(build_spec(overrides={"data": str(data)}), model_tok,
                         log=notes.append)
    # Training data is checked in full before the model loads; the evaluation files
    # from their first record (they stay lazy), so read those here in full.
    assert [r.records for r in reports] == [600, 1, 1]
    assert all(r.tools == r.records for r in reports)
    assert any("600 tool-calling records" in n for n in notes)
    from mlx_tune.data.messages import uses_tools
    for name in ("valid.jsonl", "test.jsonl"):
        records = read_records(data / name)
        assert len(records) == 60 and all(uses_tools(r.messages, r.tools) for r in records)
    calls = sum(len(m.get("tool_calls", ())) for r in read_records(data / "valid.jsonl")
                for m in r.messages)
    assert calls > 40
