"""Chat records: messages, tool calls, tool definitions, ShareGPT conversations.

The accepted shapes are mlx-lm's (and the OpenAI / transformers chat format it follows):

    {"tools": [{"type": "function", "function": {"name": ..., "parameters": {...}}}],
     "messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                  {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
                   "content": "{\\"temp\\": 12}"},
                  {"role": "assistant", "content": "It is 12 degrees in Oslo."}]}

and ShareGPT's ``{"conversations": [{"from": "human", "value": "..."}, ...]}``.

Everything is checked here, per record, with the record's ``file:line``: nothing about
the model is needed, so a bad file is refused before any model loads. Tool-call
arguments given as a JSON string are parsed into an object, because chat templates
(transformers' documentation, Hermes, Llama 3.1) serialise ``arguments`` with ``tojson``
and would otherwise double-encode the string.
"""

from __future__ import annotations

import json
from typing import Any, Optional

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names -> chat roles. "user"/"assistant" appear in some exports too.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "system": "system", "tool": "tool"}


class MessageError(ValueError):
    """A record-level problem; records.py prefixes it with file:line."""


def _shape() -> str:
    return "'messages' must be a list of {role, content} objects"


def parse_tools(value: Any) -> Optional[tuple]:
    """A record's ``tools``: a list of function specs, passed to the template as given."""
    if value is None:
        return None
    expected = ("'tools' must be a list of function specs like {\"type\": \"function\", "
                "\"function\": {\"name\": ..., \"parameters\": {...}}}")
    if not isinstance(value, list) or not value:
        raise MessageError(expected)
    for i, tool in enumerate(value):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) \
                or not spec["name"]:
            raise MessageError(f"tools[{i}]: {expected}")
        if "parameters" in spec and not isinstance(spec["parameters"], dict):
            raise MessageError(f"tools[{i}] ({spec['name']}): 'parameters' must be a JSON "
                               "schema object")
    return tuple(value)


def _arguments(value: Any, where: str) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    raise MessageError(f"{where}: 'arguments' must be a JSON object or a string holding one, "
                       f"got {json.dumps(value)[:60]}")


def _tool_calls(value: Any, i: int) -> list:
    if not isinstance(value, list) or not value:
        raise MessageError(f"message {i}: 'tool_calls' must be a non-empty list of "
                           "{id, type, function: {name, arguments}} objects")
    calls = []
    for j, call in enumerate(value):
        where = f"message {i} tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise MessageError(f"{where}: expected {{\"type\": \"function\", \"function\": "
                               "{\"name\": ..., \"arguments\": {...}}}")
        out = dict(call)
        out["function"] = {**fn, "arguments": _arguments(fn.get("arguments", {}), where)}
        calls.append(out)
    return calls


def _message(m: Any, i: int) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise MessageError(_shape())
    role = m["role"]
    if role not in ROLES:
        raise MessageError(f"message {i} has role {role!r}; expected one of " + ", ".join(ROLES))
    content = m.get("content")
    out: dict = {"role": role}
    if role == "assistant" and m.get("tool_calls") is not None:
        out["tool_calls"] = _tool_calls(m["tool_calls"], i)
        if content is None:
            content = ""  # a pure tool call; templates concatenate content
    if not isinstance(content, str):
        raise MessageError(f"message {i} ({role}): 'content' must be a string"
                           + (" (serialise a tool result with json.dumps)"
                              if role == "tool" else ""))
    out["content"] = content
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise MessageError(f"message {i} (tool): '{key}' must be a string")
                out[key] = m[key]
    return out


def _check_tool_results(messages: list[dict]) -> None:
    """Every tool message answers a call of the assistant turn before it."""
    calls: Optional[list] = None  # the calls of the latest assistant turn, if it made any
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            calls = m.get("tool_calls")
        elif m["role"] == "tool":
            if calls is None:
                raise MessageError(f"message {i} is a tool result without a preceding "
                                   "assistant tool call")
            ids = [c["id"] for c in calls if isinstance(c.get("id"), str)]
            if "tool_call_id" in m and ids and m["tool_call_id"] not in ids:
                raise MessageError(f"message {i}: tool_call_id {m['tool_call_id']!r} matches "
                                   "no call of the preceding assistant turn (ids "
                                   + ", ".join(ids) + ")")
        else:
            calls = None


def parse_messages(value: Any, *, sharegpt: bool = False) -> tuple:
    """Validated, normalised messages of one record."""
    if not isinstance(value, list) or not value:
        raise MessageError(_shape())
    messages = [_message(m, i) for i, m in enumerate(value)]
    if not any(m["role"] == "assistant" for m in messages):
        raise MessageError("'messages' has no assistant turn to train on")
    if not sharegpt:  # ShareGPT writes calls inside the assistant's text: nothing to match
        _check_tool_results(messages)
    return tuple(messages)


def from_sharegpt(value: Any) -> list[dict]:
    """ShareGPT ``conversations`` -> messages (roles human/gpt/system/tool)."""
    expected = ("'conversations' must be a list of {from, value} objects with 'from' one of "
                + ", ".join(sorted(SHAREGPT_ROLES)))
    if not isinstance(value, list) or not value:
        raise MessageError(expected)
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise MessageError(f"conversations[{i}]: {expected}")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise MessageError(f"conversations[{i}] has from={turn.get('from')!r}; expected one "
                               "of " + ", ".join(sorted(SHAREGPT_ROLES)))
        out.append({"role": role, "content": turn["value"]})
    return out


def uses_tools(messages: Optional[tuple], tools: Optional[tuple]) -> bool:
    return bool(tools) or any(m["role"] == "tool" or "tool_calls" in m for m in messages or ())


# -- preference records (tokenize.make_pair and unpaired.make_unpaired tokenize them) --

PAIRED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")


def _prompt(value: Any) -> tuple:
    if isinstance(value, str):
        return ({"role": "user", "content": value},)
    if not isinstance(value, list) or not value:
        raise MessageError("'prompt' must be a string or a non-empty list of {role, content} "
                           "messages")
    return tuple(_message(m, i) for i, m in enumerate(value))


def _completion(value: Any, key: str) -> tuple:
    if isinstance(value, str):
        messages = ({"role": "assistant", "content": value},)
    elif isinstance(value, list) and value:
        messages = tuple(_message(m, i) for i, m in enumerate(value))
        if messages[0]["role"] != "assistant":
            raise MessageError(f"'{key}' must start with an assistant message, not "
                               f"{messages[0]['role']!r}")
    else:
        raise MessageError(f"'{key}' must be a string or a non-empty list of assistant "
                           "messages")
    if not any(m["content"].strip() or m.get("tool_calls") for m in messages):
        raise MessageError(f"'{key}' is empty: there is no completion to score")
    return messages


def parse_preference(obj: dict) -> dict:
    """The Record fields of a paired record; MessageError says what is wrong."""
    missing = [k for k in PAIRED_FIELDS if k not in obj or obj[k] is None]
    if missing:
        raise MessageError("preference records need 'prompt', 'chosen' and 'rejected'; "
                           f"'{missing[0]}' is missing")
    return {"messages": _prompt(obj["prompt"]), "chosen": _completion(obj["chosen"], "chosen"),
            "rejected": _completion(obj["rejected"], "rejected"),
            "tools": parse_tools(obj.get("tools"))}


def parse_unpaired(obj: dict) -> dict:
    """The Record fields of an unpaired (KTO) record: a prompt, one completion and a JSON
    boolean ``label`` (true: desirable); MessageError says what is wrong."""
    missing = [k for k in UNPAIRED_FIELDS if k not in obj or obj[k] is None]
    if missing:
        raise MessageError("unpaired records need 'prompt', 'completion' and 'label'; "
                           f"'{missing[0]}' is missing")
    if not isinstance(obj["label"], bool):
        raise MessageError("'label' must be true (a desirable completion) or false (an "
                           f"undesirable one), got {json.dumps(obj['label'])[:40]}")
    return {"messages": _prompt(obj["prompt"]),
            "completion": _completion(obj["completion"], "completion"),
            "label": obj["label"], "tools": parse_tools(obj.get("tools"))}
