"""`mlx-tune generate --tools FILE.json` and samples of tool records: the function specs
reach the chat template, which writes them Hermes-style (a <tools> block in a system turn).
The prompt each generate path actually decodes from is captured and checked against the
format written out by hand; what the tiny model replies is not asserted."""

from __future__ import annotations

import json

import pytest

from mlx_tune.cli import main
from mlx_tune.config.spec import build_spec

TOOLS = [{"type": "function", "function": {
    "name": "get_cooking_time", "description": "Cooking time of a dish",
    "parameters": {"type": "object", "properties": {"dish": {"type": "string"}}}}}]
QUESTION = "How long should I bake the lemon drizzle cake?"


def check_prompt(text: str) -> None:
    block = ("<|im_start|>system\nYou are a function calling AI model. Here are the available "
             "tools: <tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>")
    assert block in text, text
    end = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert text.index(block) < text.index(end) and text.endswith(end), text


@pytest.fixture
def tools_file(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(TOOLS))
    return path


def capture_mlx(monkeypatch) -> list[str]:
    import importlib
    module = importlib.import_module("mlx_lm.generate")  # mlx_lm.generate is also a function
    seen, real = [], module.generate

    def spy(model, tokenizer, prompt, **kw):
        seen.append(prompt)
        return real(model, tokenizer, prompt, **kw)
    monkeypatch.setattr(module, "generate", spy)
    return seen


def capture_torch(monkeypatch) -> list[list[int]]:
    from transformers import GenerationMixin
    seen, real = [], GenerationMixin.generate

    def spy(self, *a, **kw):
        seen.append(kw["input_ids"][0].tolist())
        return real(self, *a, **kw)
    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return seen


def test_generate_cli_passes_tools_on_mlx(tiny_model, tools_file, monkeypatch, capsys):
    seen = capture_mlx(monkeypatch)
    assert main(["generate", "--backend", "mlx", "--model", str(tiny_model), "--tools",
                 str(tools_file), "--prompt", QUESTION, "--max-tokens", "3"]) == 0
    check_prompt(seen[0])


def test_generate_cli_passes_tools_on_torch(tiny_model, tools_file, monkeypatch):
    pytest.importorskip("torch")
    from mlx_tune.models.tokenizer import load_tokenizer
    seen = capture_torch(monkeypatch)
    assert main(["generate", "--backend", "torch", "--model", str(tiny_model), "--tools",
                 str(tools_file), "--prompt", QUESTION, "--max-tokens", "3"]) == 0
    check_prompt(load_tokenizer(tiny_model).decode(seen[0], skip_special_tokens=False))


def test_backend_generate_passes_tools(tiny_model, monkeypatch):
    """Backend.generate, which samples during training, on both backends."""
    from mlx_tune.backends.mlx.backend import MLXBackend
    spec = build_spec(overrides={"model": str(tiny_model), "data": "x", "num_samples": 1})
    seen = capture_mlx(monkeypatch)
    backend = MLXBackend()
    backend.load(spec, tiny_model)
    backend.generate([{"role": "user", "content": QUESTION}], 2, tools=TOOLS)
    check_prompt(seen[0])
    pytest.importorskip("torch")
    from mlx_tune.backends.torch.backend import TorchBackend
    seen_ids = capture_torch(monkeypatch)
    tb = TorchBackend()
    tb.load(spec, tiny_model)
    tb.generate([{"role": "user", "content": QUESTION}], 2, tools=TOOLS)
    check_prompt(tb.tokenizer.decode(seen_ids[0], skip_special_tokens=False))


def test_samples_of_tool_records_carry_their_tools(tiny_model):
    """The shipped tool data: each sample prompt goes to generate with its record's tools."""
    from pathlib import Path
    from mlx_tune.data import load_data
    from mlx_tune.models.tokenizer import load_tokenizer
    from mlx_tune.training.samples import run_samples

    data_dir = Path(__file__).resolve().parents[2] / "data" / "tools"
    spec = build_spec(overrides={"model": str(tiny_model), "data": str(data_dir),
                                 "num_samples": 2, "prefetch": 0})
    bundle = load_data(spec, load_tokenizer(tiny_model), log=lambda m: None)
    calls = []

    class Recorder:
        def generate(self, messages, max_tokens, tools=None):
            calls.append((messages, tools))
            return ""
    try:
        run_samples(Recorder(), spec, bundle)
    finally:
        bundle.close()
    records = [json.loads(x) for x in (data_dir / "valid.jsonl").read_text().splitlines()[:2]]
    assert [tools for _, tools in calls] == [r["tools"] for r in records]
    assert calls[0][0][0] == records[0]["messages"][0]
