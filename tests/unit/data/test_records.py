"""mlx_tune.data.records: formats, validation and one-line file:line errors."""

from __future__ import annotations

import pytest

from mlx_tune.data import DataError, load_data
from mlx_tune.data.records import find_files, read_records
from mlx_tune.data.testing import chat, tiny_tokenizer, write_jsonl
from mlx_tune.config.schema import Spec


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_each_format_parses(tmp_path):
    c = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Soup?"},
                      {"role": "assistant", "content": "Yes."}],
         "quality": 0.5, "difficulty": 2, "source": "x"}])
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Soup?", "completion": "Yes."}])
    t = write_jsonl(tmp_path / "t.jsonl", ["", {"text": "Soup is good."}])  # blank line ok
    [rc], [rp], [rt] = read_records(c), read_records(p), read_records(t)
    assert rc.kind == "chat" and rc.quality == 0.5 and rc.difficulty == 2
    assert rc.extra == {"source": "x"} and rc.user_turns == 1 and len(rc.messages) == 3
    assert rp.kind == "completions" and rp.messages[0] == {"role": "user", "content": "Soup?"}
    assert rp.messages[1] == {"role": "assistant", "content": "Yes."}
    assert rt.kind == "text" and rt.text == "Soup is good." and rt.line == 2


@pytest.mark.parametrize("line,expected", [
    ('{"messages": [{"role": "user", "content": "a"} {"role": "assistant"}]}',
     "invalid JSON (Expecting ',' delimiter)"),
    ('{"messages": "hello"}', "'messages' must be a list of {role, content} objects"),
    ('{"messages": [{"role": "user"}]}', "message 0 (user): 'content' must be a string"),
    ('{"foo": 1}', "record has none of 'messages', 'conversations' (ShareGPT), "
                   "'prompt'/'completion', 'text'"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"messages": [{"role": "user", "content": "a"}]}',
     "'messages' has no assistant turn to train on"),
    ('{"messages": [{"role": "bot", "content": "a"}]}',
     "message 0 has role 'bot'; expected one of system, user, assistant"),
    ('{"text": "a"}', "record is in text format but the file is in chat format"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],'
     ' "quality": "high"}', "'quality' must be a number, got 'high'"),
])
def test_malformed_line_names_file_and_line(tmp_path, tok, line, expected):
    good = chat("Soup?", "Yes.")
    path = write_jsonl(tmp_path / "train.jsonl", [good, good, line, good])
    with pytest.raises(DataError) as err:
        load_data(Spec(data=str(tmp_path), batch_size=1), tok, log=lambda m: None)
    message = str(err.value)
    assert message.startswith(f"{path}:3: {expected}")
    assert "\n" not in message and isinstance(err.value, ValueError)


def test_exact_invalid_json_message(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [chat("a", "b"), '{"text": "a" "b"}'])
    with pytest.raises(DataError, match=None) as err:
        read_records(path)
    assert str(err.value) == f"{path}:2: invalid JSON (Expecting ',' delimiter)"


def test_missing_train_names_directory_and_files(tmp_path, tok):
    write_jsonl(tmp_path / "valid.jsonl", [chat("a", "b")])
    with pytest.raises(DataError) as err:
        load_data(Spec(data=str(tmp_path)), tok)
    assert str(tmp_path) in str(err.value)
    assert "train.jsonl" in str(err.value) and "valid.jsonl" in str(err.value)
    with pytest.raises(DataError, match="not found"):
        find_files(tmp_path / "nope")


def test_empty_file_is_an_error(tmp_path, tok):
    (tmp_path / "train.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="train.jsonl: file is empty"):
        load_data(Spec(data=str(tmp_path)), tok)


def test_valid_or_val_name(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat("a", "b")])
    write_jsonl(tmp_path / "val.jsonl", [chat("a", "b")])
    assert find_files(tmp_path).valid == tmp_path / "val.jsonl"
    write_jsonl(tmp_path / "valid.jsonl", [chat("a", "b")])
    with pytest.raises(DataError, match="both valid.jsonl and val.jsonl"):
        find_files(tmp_path)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid UTF-8"):
        read_records(path)
