"""Tests for mlx_tune.models.hub: local directories, aliases, and a fake Hugging Face cache.

No test touches the network: the Hub tests run with HF_HUB_OFFLINE=1 against a cache
built in tmp_path in huggingface_hub's own layout, or with snapshot_download replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from mlx_tune.models import hub
from mlx_tune.models.hub import ModelError, ModelNotCachedError, ResolvedModel, resolve_model

REPO_ROOT = Path(__file__).resolve().parents[3]


def quiet(_msg: str) -> None:
    pass


def make_model_dir(path: Path, config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "mistral"}))
    (path / "model.safetensors").write_bytes(b"\0" * 8)
    return path


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes],
                 sha: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """One repo in the real hub layout: blobs/<hash>, refs/main, snapshots/<sha>/<file> -> blob."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(sha)
    snapshot = storage / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache in tmp_path.

    huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE into
    ``huggingface_hub.constants`` once at import, and snapshot_download reads
    ``constants.HF_HUB_CACHE`` at call time: set the variables (for anything that
    re-reads the environment) and patch the module attributes (for the imported copy).
    """
    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


CONFIG = json.dumps({"model_type": "mistral"}).encode()
CONFIG_4BIT = json.dumps({"model_type": "mistral",
                          "quantization": {"group_size": 64, "bits": 4}}).encode()


# -- local directories ---------------------------------------------------------------

def test_local_directory_used_as_is(tmp_path):
    d = make_model_dir(tmp_path / "my-model")
    r = resolve_model(str(d), quantize=None, backend="mlx", log=quiet)
    assert r == ResolvedModel(path=d.resolve(), repo_id=None, alias=None, prequantized_bits=None)


def test_local_directory_relative_and_prequantized(tmp_path, monkeypatch):
    make_model_dir(tmp_path / "q", {"model_type": "llama", "quantization": {"bits": 4}})
    monkeypatch.chdir(tmp_path)
    r = resolve_model("q", quantize=None, backend="mlx", log=quiet)
    assert r.path == (tmp_path / "q").resolve() and r.prequantized_bits == 4


def test_local_directory_without_config_json(tmp_path):
    d = tmp_path / "weights-only"
    d.mkdir()
    with pytest.raises(ModelError) as e:
        resolve_model(str(d), quantize=None, backend="mlx", log=quiet)
    msg = str(e.value)
    assert str(d) in msg and "config.json" in msg and "\n" not in msg


def test_missing_path_is_not_taken_for_a_repo_id(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope" / "model"), quantize=None, backend="mlx", log=quiet)
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("./nope", quantize=None, backend="mlx", log=quiet)


def test_file_is_not_a_model_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(f), quantize=None, backend="mlx", log=quiet)


def test_empty_name():
    with pytest.raises(ModelError, match="no model given"):
        resolve_model("  ", quantize=None, backend="mlx", log=quiet)


# -- the alias table -------------------------------------------------------------------

def test_alias_table_is_well_formed_and_shipped():
    aliases = hub.load_aliases()
    expected = {"Hermes-2-Pro-Mistral-7B", "Mistral-7B-Instruct-v0.3", "Llama-3.2-1B-Instruct",
                "Llama-3.2-3B-Instruct", "Qwen2.5-0.5B-Instruct", "Qwen2.5-7B-Instruct",
                "Phi-3.5-mini-instruct", "tiny-mistral"}
    assert expected <= set(aliases)
    for name, entry in aliases.items():
        if "repo" in entry:
            assert hub._REPO_ID.match(entry["repo"]), name
            assert entry.get("mlx_4bit", "mlx-community/x").startswith("mlx-community/"), name
        assert entry.get("description"), name
    # The package copy is the one that ships; the repository's configs/ shows the same table.
    assert hub.ALIASES_PATH.is_relative_to(Path(hub.__file__).parent.parent)
    assert (REPO_ROOT / "configs" / "models.yaml").read_text() == hub.ALIASES_PATH.read_text()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """snapshot_download replaced: every repo id maps to a directory under tmp_path."""
    calls: list[dict] = []

    def fake(repo_id, **kwargs):
        calls.append(dict(repo_id=repo_id, **kwargs))
        if state["cached"] is not None and repo_id not in state["cached"]:
            from huggingface_hub.errors import LocalEntryNotFoundError
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder\n...")
        d = tmp_path / "snap" / repo_id.replace("/", "--")
        if not d.exists():
            make_model_dir(d, {"model_type": "mistral", **(
                {"quantization": {"bits": 4, "group_size": 64}} if "4bit" in repo_id else {})})
        return str(d)

    state: dict = {"cached": None, "calls": calls}  # cached=None: every repo resolves
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(hub, "hub_answers", lambda *a: None)  # the Hub "answers"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return state


@pytest.mark.parametrize("typed", ["Hermes-2-Pro-Mistral-7B", "hermes-2-pro-mistral-7b",
                                   "HERMES-2-PRO-MISTRAL-7B"])
def test_alias_case_insensitive_to_original_repo(fake_hub, typed):
    logs: list[str] = []
    r = resolve_model(typed, quantize=None, backend="mlx", log=logs.append)
    assert r.repo_id == "NousResearch/Hermes-2-Pro-Mistral-7B"
    assert r.alias == "Hermes-2-Pro-Mistral-7B" and r.prequantized_bits is None
    assert (r.path / "config.json").is_file()
    call = fake_hub["calls"][-1]
    assert call["repo_id"] == "NousResearch/Hermes-2-Pro-Mistral-7B"
    assert call["local_files_only"] is False
    assert "*.safetensors" in call["allow_patterns"] and "*.py" not in call["allow_patterns"]


def test_alias_quantize_4_on_mlx_uses_prequantized_variant(fake_hub):
    logs: list[str] = []
    r = resolve_model("hermes-2-pro-mistral-7b", quantize=4, backend="mlx", log=logs.append)
    assert r.repo_id == "mlx-community/Hermes-2-Pro-Mistral-7B-4bit"
    assert r.prequantized_bits == 4 and r.alias == "Hermes-2-Pro-Mistral-7B"
    assert len(logs) == 1 and "pre-quantized" in logs[0] and "4-bit" in logs[0]


@pytest.mark.parametrize("quantize,backend", [(4, "torch"), (8, "mlx"), (None, "mlx")])
def test_alias_other_quantization_keeps_original_repo(fake_hub, quantize, backend):
    r = resolve_model("Hermes-2-Pro-Mistral-7B", quantize=quantize, backend=backend, log=quiet)
    assert r.repo_id == "NousResearch/Hermes-2-Pro-Mistral-7B" and r.prequantized_bits is None


def test_prequantized_variant_not_cached_falls_back_to_original(fake_hub):
    fake_hub["cached"] = {"NousResearch/Hermes-2-Pro-Mistral-7B"}
    logs: list[str] = []
    r = resolve_model("Hermes-2-Pro-Mistral-7B", quantize=4, backend="mlx", log=logs.append)
    assert r.repo_id == "NousResearch/Hermes-2-Pro-Mistral-7B" and r.prequantized_bits is None
    assert len(logs) == 1 and "quantizing to 4 bits on load" in logs[0]


def test_neither_variant_cached_names_the_prequantized_one(fake_hub):
    fake_hub["cached"] = set()
    with pytest.raises(ModelNotCachedError, match="mlx-community/Hermes-2-Pro-Mistral-7B-4bit"):
        resolve_model("Hermes-2-Pro-Mistral-7B", quantize=4, backend="mlx", log=quiet)


def test_trust_remote_code_adds_python_files(fake_hub):
    resolve_model("Phi-3.5-mini-instruct", quantize=None, backend="torch",
                  trust_remote_code=True, log=quiet)
    assert "*.py" in fake_hub["calls"][-1]["allow_patterns"]


def test_offline_env_set_after_import_still_means_local_files_only(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")   # constants.HF_HUB_OFFLINE stays False
    resolve_model("Qwen/Qwen2.5-0.5B-Instruct", quantize=None, backend="mlx", log=quiet)
    assert fake_hub["calls"][-1]["local_files_only"] is True


def test_unknown_alias_lists_close_names():
    with pytest.raises(ModelError) as e:
        resolve_model("Hermes-Pro-Mistral", quantize=None, backend="mlx", log=quiet)
    msg = str(e.value)
    assert "unknown model 'Hermes-Pro-Mistral'" in msg
    assert "Hermes-2-Pro-Mistral-7B" in msg
    assert "org/name" in msg and "local" in msg and "\n" not in msg


def test_unknown_alias_with_nothing_close_lists_all():
    with pytest.raises(ModelError, match="known aliases: .*tiny-mistral"):
        resolve_model("zzzzzzzz", quantize=None, backend="mlx", log=quiet)


def test_tiny_mistral_alias_points_into_the_package():
    embedded = hub.PACKAGE_DIR / "assets" / "tiny-mistral"
    if (embedded / "config.json").is_file():
        r = resolve_model("Tiny-Mistral", quantize=4, backend="mlx", log=quiet)
        assert r.path == embedded.resolve() and r.alias == "tiny-mistral" and r.repo_id is None
    else:  # a teammate's asset not built yet: the error must say where it should be
        with pytest.raises(ModelError, match="assets/tiny-mistral"):
            resolve_model("tiny-mistral", quantize=None, backend="mlx", log=quiet)


# -- a fake Hugging Face cache, resolved by huggingface_hub itself -----------------------

def test_repo_id_resolves_to_cached_snapshot_offline(hf_cache):
    snapshot = add_to_cache(hf_cache, "acme/tiny-chat",
                            {"config.json": CONFIG, "model.safetensors": b"\0" * 16,
                             "tokenizer.json": b"{}"})
    r = resolve_model("acme/tiny-chat", quantize=None, backend="mlx", log=quiet)
    assert r.path == snapshot and r.repo_id == "acme/tiny-chat" and r.alias is None
    assert json.loads((r.path / "config.json").read_text()) == {"model_type": "mistral"}


def test_alias_resolves_through_the_fake_cache(hf_cache):
    snapshot = add_to_cache(hf_cache, "mlx-community/Qwen2.5-0.5B-Instruct-4bit",
                            {"config.json": CONFIG_4BIT, "model.safetensors": b"\0" * 16})
    logs: list[str] = []
    r = resolve_model("qwen2.5-0.5b-instruct", quantize=4, backend="mlx", log=logs.append)
    assert r.path == snapshot and r.prequantized_bits == 4 and len(logs) == 1


def test_repo_id_missing_from_cache_offline(hf_cache):
    add_to_cache(hf_cache, "acme/other", {"config.json": CONFIG, "model.safetensors": b"x"})
    with pytest.raises(ModelError) as e:
        resolve_model("acme/not-here", quantize=None, backend="mlx", log=quiet)
    msg = str(e.value)
    assert "\n" not in msg
    assert "not in the local Hugging Face cache" in msg and str(hf_cache) in msg
    assert "hf download acme/not-here" in msg and "huggingface-cli download acme/not-here" in msg
    assert "HF_HUB_OFFLINE" in msg and "path" in msg


def test_cached_snapshot_without_weights_is_reported(hf_cache):
    add_to_cache(hf_cache, "acme/config-only", {"config.json": CONFIG})
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights"):
        resolve_model("acme/config-only", quantize=None, backend="mlx", log=quiet)
