"""A Hugging Face endpoint that accepts connections and never answers (a dead proxy, a
captive portal) must not hang a run: the model or dataset comes from the cache when it is
there, else one line says the Hub cannot be reached, in seconds.

Each case runs in a child process (huggingface_hub reads its endpoint at import), against a
loopback server that holds every connection open without a byte in reply (conftest.silent_server).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each case waits out the Hub timeout in a child process

SHA = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache: Path, kind: str, repo_id: str, files: dict[str, str]) -> None:
    """A repo in the hub cache layout (refs/main -> snapshots/<sha>/...)."""
    storage = cache / f"{kind}--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(SHA)
    for name, text in files.items():
        path = storage / "snapshots" / SHA / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def run_child(code: str, endpoint: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "home"), "HF_DATASETS_CACHE": str(tmp_path / "ds"),
           "MLX_TUNE_HUB_TIMEOUT": "2", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    return done, time.monotonic() - start


MODEL = """
from mlx_tune.models.hub import ModelError, resolve_model
try:
    print("PATH", resolve_model("org/model", quantize=None, backend="mlx").path)
except ModelError as e:
    print("ERROR", e)
"""


def test_uncached_model_fails_in_seconds_with_one_line(silent_server, tmp_path):
    done, took = run_child(MODEL, silent_server, tmp_path)
    out = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stderr
    assert out[-1].startswith("ERROR") and "'org/model'" in out[-1]
    assert "cannot be reached" in out[-1] and "Traceback" not in done.stderr
    assert took < 60


def test_cached_model_is_used_when_the_hub_does_not_answer(silent_server, tmp_path):
    cached_repo(tmp_path / "hub", "models", "org/model",
                {"config.json": json.dumps({"model_type": "mistral"}),
                 "model.safetensors": "\0" * 8})
    done, took = run_child(MODEL, silent_server, tmp_path)
    out = done.stdout.strip().splitlines()
    assert out[-1] == f"PATH {tmp_path / 'hub' / 'models--org--model' / 'snapshots' / SHA}"
    assert any("cannot be reached" in line and "cached snapshot" in line for line in out)
    assert took < 60


DATASET = """
from types import SimpleNamespace
from mlx_tune.data.hf import find_data
from mlx_tune.data.records import DataError
spec = SimpleNamespace(data="org/chats", data_fields=None, data_split="train", val_split=0,
                       streaming=False)
try:
    files = find_data(spec)
    print("ROWS", sum(1 for _ in files.train.lines()))
except DataError as e:
    print("ERROR", e)
"""


def test_dataset_id_uses_the_cache_or_fails_in_seconds(silent_server, tmp_path):
    pytest.importorskip("datasets")
    done, took = run_child(DATASET, silent_server, tmp_path)
    assert done.stdout.strip().splitlines()[-1].startswith("ERROR"), done.stderr
    assert "'org/chats'" in done.stdout and took < 60
    rows = [{"text": f"row {i}"} for i in range(5)]
    cached_repo(tmp_path / "hub", "datasets", "org/chats",
                {"data/train.jsonl": "".join(json.dumps(r) + "\n" for r in rows)})
    done, took = run_child(DATASET, silent_server, tmp_path)
    assert done.stdout.strip().splitlines()[-1] == "ROWS 5", done.stdout + done.stderr
    assert took < 60
