"""Adapters a hostile user hands to convert-adapter (issue 22): truncated or corrupt
files, config values of the wrong type, modules the base does not have, a destination
holding another adapter. Both formats (mlx-lm's and peft's, the torch backend's);
only the tiny base's safetensors header is read, no model loads."""

from __future__ import annotations

import json
import os
import shutil

import mlx.core as mx
import pytest

from mlx_tune.cli import main
from mlx_tune.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_USAGE


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "traceback in" not in err, err
    return err



def base_dims(tiny_model):
    from mlx_tune.export.fit import base_shapes
    return base_shapes(tiny_model)


def mlx_adapter(tiny_model, path, modules=("self_attn.q_proj", "self_attn.v_proj"), rank=4):
    """An mlx-lm adapter for the tiny base's last two blocks, shaped from its header."""
    shapes = base_dims(tiny_model)
    weights = {}
    for layer in (2, 3):
        for module in modules:
            name = f"model.layers.{layer}.{module}"
            out, inp = shapes.get(f"{name}.weight", (64, 256))
            weights[f"{name}.lora_a"] = mx.random.normal((inp, rank))
            weights[f"{name}.lora_b"] = mx.random.normal((rank, out))
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), weights, metadata={"format": "mlx"})
    (path / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 2, "model": str(tiny_model),
        "lora_parameters": {"rank": rank, "scale": 2.0, "dropout": 0.0,
                            "keys": sorted(modules)}}))
    return path


def peft_adapter(tiny_model, tmp_path):
    src = mlx_adapter(tiny_model, tmp_path / "mlx-src")
    assert main(["convert-adapter", "--to", "peft", str(src), str(tmp_path / "peft")]) == 0
    return tmp_path / "peft"


def convert(capsys, to, src, dst):
    code = main(["convert-adapter", "--to", to, str(src), str(dst)])
    return code, capsys.readouterr().err


def test_convert_adapter_never_writes_into_another_adapter(tiny_model, tmp_path, capsys):
    src = mlx_adapter(tiny_model, tmp_path / "a")
    other = peft_adapter(tiny_model, tmp_path)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    code, err = convert(capsys, "peft", src, other)
    assert code == EXIT_USAGE and "exists and is not empty" in err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    (tmp_path / "empty").mkdir()
    code, _ = convert(capsys, "peft", src, tmp_path / "empty")
    assert code == EXIT_OK and (tmp_path / "empty" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".*tmp-*"))  # the temporary directory is gone


def damage_truncate(path):
    os.truncate(path, os.path.getsize(path) - 100)


@pytest.mark.parametrize("fmt", ["mlx", "peft"])
@pytest.mark.parametrize("damage,culprit", [
    (lambda d, w, c: damage_truncate(d / w), "{w}: not a readable safetensors file"),
    (lambda d, w, c: (d / w).write_bytes(b"\x00" * 3), "{w}: not a readable safetensors file"),
    (lambda d, w, c: (d / c).write_text((d / c).read_text()[:40]), "{c}:"),
    (lambda d, w, c: (d / c).write_text("[1, 2]"), "{c}: expected a JSON object"),
])
def test_corrupt_adapter_files_are_named(tiny_model, tmp_path, capsys, fmt, damage, culprit):
    src = mlx_adapter(tiny_model, tmp_path / "a") if fmt == "mlx" else peft_adapter(tiny_model, tmp_path)
    capsys.readouterr()
    weights = "adapters.safetensors" if fmt == "mlx" else "adapter_model.safetensors"
    damage(src, weights, "adapter_config.json")
    code, err = convert(capsys, "peft" if fmt == "mlx" else "mlx", src, tmp_path / "out")
    assert code == EXIT_ERROR and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(src / culprit.format(w=weights, c="adapter_config.json")) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt,key,value,culprit", [
    ("mlx", "lora_parameters", {"rank": 4, "scale": "two"}, "key 'scale' is 'two'"),
    ("mlx", "lora_parameters", {"rank": [4], "scale": 2.0}, "key 'rank' is [4]"),
    ("mlx", "model", 7, "key 'model' is 7"),
    ("peft", "r", "four", "key 'r' is 'four'; expected an integer"),
    ("peft", "lora_alpha", None, "key 'lora_alpha' missing"),
    ("peft", "lora_dropout", "none", "key 'lora_dropout' is 'none'"),
])
def test_adapter_config_values_of_the_wrong_type_name_the_key(tiny_model, tmp_path, capsys,
                                                              fmt, key, value, culprit):
    src = mlx_adapter(tiny_model, tmp_path / "a") if fmt == "mlx" else peft_adapter(tiny_model, tmp_path)
    capsys.readouterr()
    config = json.loads((src / "adapter_config.json").read_text())
    config[key] = value
    (src / "adapter_config.json").write_text(json.dumps(config))
    code, err = convert(capsys, "peft" if fmt == "mlx" else "mlx", src, tmp_path / "out")
    assert code == EXIT_ERROR and f"{src / 'adapter_config.json'}" in err and culprit in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("to", ["peft", "mlx"])
def test_an_adapter_for_modules_the_base_lacks_is_refused(tiny_model, tmp_path, capsys, to):
    src = mlx_adapter(tiny_model, tmp_path / "a", modules=("self_attn.qkv_proj",))
    if to == "mlx":  # the same adapter in peft's format, converted without the check
        from mlx_tune.export.adapters import read_adapter, save_peft
        save_peft(read_adapter(src), tmp_path / "p")
        src = tmp_path / "p"
    code, err = convert(capsys, to, src, tmp_path / "out")
    assert code == EXIT_ERROR and "model.layers.2.self_attn.qkv_proj, which the base" in err
    assert not (tmp_path / "out").exists()
    wide = mlx_adapter(tiny_model, tmp_path / "w")
    weights = mx.load(str(wide / "adapters.safetensors"))
    weights["model.layers.3.self_attn.v_proj.lora_b"] = mx.zeros((4, 999))
    mx.save_safetensors(str(wide / "adapters.safetensors"), weights)
    code, err = convert(capsys, "peft", wide, tmp_path / "out2")
    assert code == EXIT_ERROR and "model.layers.3.self_attn.v_proj is [999, 256] in the adapter" in err


def test_generate_tools_with_a_template_that_drops_them_is_refused(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {
        "name": "get_weather", "description": "d", "parameters": {"type": "object"}}}]))
    code = main(["generate", "--model", str(model), "--prompt", "hi", "--tools", str(tools),
                 "--backend", "mlx"])
    err = one_line(capsys)
    assert code == EXIT_ERROR and err.startswith(f"mlx-tune: error: --tools {tools}: tools")
    assert "drops tool definitions" in err
