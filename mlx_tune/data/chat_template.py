"""The tokenizer's chat template: rendering messages, and whether it can render tools.

``tokenize`` builds token ids and masks on ``render``; the preflight and
``generate --tools`` ask ``check_tool_template`` before anything loads.
"""

from __future__ import annotations

from typing import Optional

from mlx_tune.data.records import DataError


def render(tokenizer, messages: list, generation_prompt: bool,
           tools: Optional[list] = None) -> str:
    """The messages through the tokenizer's chat template, as text (tools=None renders
    exactly as before for templates that know no tools)."""
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=generation_prompt)


# A conversation that exercises every tool feature, with names that no template invents.
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe_tool_spec", "description": "probe",
    "parameters": {"type": "object", "properties": {"probe_arg": {"type": "string"}}}}}]
_PROBE = [{"role": "user", "content": "probe"},
          {"role": "assistant", "content": "", "tool_calls": [
              {"id": "call_probe", "type": "function",
               "function": {"name": "probe_call_name", "arguments": {"probe_arg": "x"}}}]},
          {"role": "tool", "tool_call_id": "call_probe", "name": "probe_call_name",
           "content": "probe_result_text"},
          {"role": "assistant", "content": "done"}]
_PROBED: dict = {}  # (tokenizer id, template) -> problem or ""


def tool_template_problem(tokenizer) -> str:
    """What the chat template drops or fails on when given tools; "" when it renders all."""
    template = getattr(tokenizer, "chat_template", None)
    key = (id(tokenizer), str(template))
    if key not in _PROBED:
        try:
            text = render(tokenizer, _PROBE, False, _PROBE_TOOLS)
            missing = [what for what, mark in (("tool definitions", "probe_tool_spec"),
                                               ("tool calls", "probe_call_name"),
                                               ("call arguments", "probe_arg"),
                                               ("tool results", "probe_result_text"))
                       if mark not in text]
            _PROBED[key] = f"it drops {', '.join(missing)}" if missing else ""
        except Exception as e:  # noqa: BLE001 - any template failure is the answer
            _PROBED[key] = f"it fails: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return _PROBED[key]


def check_tool_template(tokenizer, where: str, what: str = "the record uses tools") -> None:
    """Refuse tools (training data, `generate --tools`) for a template that cannot render
    them, naming model and remedy."""
    if not getattr(tokenizer, "chat_template", None):
        problem = "it has no chat template"
    else:
        problem = tool_template_problem(tokenizer)
    if problem:
        model = getattr(tokenizer, "name_or_path", "") or "the model"
        raise DataError(
            f"{where}: {what}, but the chat template of {model} cannot "
            f"render them ({problem}); use a tool-calling model (e.g. "
            "NousResearch/Hermes-2-Pro-Mistral-7B) or put a tool-aware 'chat_template' in "
            "its tokenizer_config.json, such as Hermes-2-Pro's ChatML one "
            "(mlx_tune/assets/tiny-mistral/chat_template.jinja)")
