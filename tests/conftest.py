"""Shared fixtures. The suite runs with the same BLAS fix as the product: on Linux,
pytest re-executes itself once with OpenBLAS preloaded (the system's, else the one pip
installed with mlx-tune); MLX's bundled reference BLAS makes every training test ~10-30x
slower."""

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

import mlx_tune
from mlx_tune.config.schema import Spec
from mlx_tune.config.spec import build_spec
from mlx_tune.system.blas import maybe_reexec_with_openblas


def pytest_configure(config: pytest.Config) -> None:
    # Give the terminal back before exec: pytest already redirected fds 1 and 2.
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None or os.environ.get("MLX_TUNE_BLAS"):
        return
    capman.stop_global_capturing()
    maybe_reexec_with_openblas(list(config.invocation_params.args), module="pytest",
                               isolate=False)  # `python -m pytest`, as the user ran it
    capman.start_global_capturing()  # no exec happened (no OpenBLAS, or fix disabled)


# The tiers, fastest first: `python -m pytest -q` reports a broken unit before it starts
# the minutes of model and end-to-end runs. Within a tier, files keep their order.
TIER_ORDER = {"unit": 0, "model": 1, "e2e": 2}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent

    def tier(item: pytest.Item) -> int:
        parts = Path(item.path).relative_to(tests).parts
        return TIER_ORDER.get(parts[0], 0) if len(parts) > 1 else 0

    items.sort(key=tier)


REPO = Path(__file__).resolve().parents[1]

# MLX_TUNE_TEST_MODEL points the suite at another build of the tiny model.
TINY = Path(os.environ.get("MLX_TUNE_TEST_MODEL")
            or Path(mlx_tune.__file__).parent / "assets" / "tiny-mistral")
RECIPES = REPO / "data" / "recipes"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    if not (TINY / "model.safetensors").exists():
        pytest.skip("the embedded tiny model is not built (python scripts/build_tiny_model.py)")
    return TINY


@pytest.fixture(scope="session")
def recipes() -> Path:
    return RECIPES


@pytest.fixture(scope="session")
def recipe_slice(recipes):
    """``recipe_slice(dest, train=16, valid=4, test=6)``: a data directory holding the
    first lines of the shipped recipe splits (a small, real dataset for short runs)."""
    def write(dest: Path, train: int = 16, valid: int = 4, test: int = 6) -> Path:
        from mlx_tune.data.testing import write_jsonl
        for split, n in (("train", train), ("valid", valid), ("test", test)):
            write_jsonl(dest / f"{split}.jsonl",
                        (recipes / f"{split}.jsonl").read_text().splitlines()[:n])
        return dest
    return write


# A run of the tiny model that takes seconds: small batches and rows, a few steps, one
# validation batch, nothing printed but plain lines, nothing read ahead, no sample
# generation, no dropout (runs compare exactly) and no early stop before step 1000.
TINY_RUN = {
    "batch_size": 4, "max_length": 128, "max_steps": 8, "warmup_steps": 1,
    "learning_rate": 1e-3, "eval_steps": 4, "val_batches": 1, "checkpoint_interval": 4,
    "report_every": 2, "num_samples": 0, "prefetch": 0, "dashboard": "plain",
    "tensorboard": False, "lora.dropout": 0.0, "early_stopping.warmup": 1000,
}
# The Spec's sections (lora, ema, early_stopping, ...): fields whose default is a dataclass.
SECTIONS = {f.name for f in dataclasses.fields(Spec)
            if f.default_factory is not dataclasses.MISSING
            and dataclasses.is_dataclass(f.default_factory())}


@pytest.fixture(scope="session")
def tiny_data(recipe_slice, tmp_path_factory) -> Path:
    """The first 256/32/16 recipe records: every run and load_data of ``tiny_spec``
    tokenizes these, not all 1500+150 (1.7 CPU seconds each time)."""
    return recipe_slice(tmp_path_factory.mktemp("tiny-data"), train=256, valid=32, test=16)


@pytest.fixture(scope="session")
def tiny_spec(tiny_model, tiny_data, tmp_path_factory) -> Callable[..., Spec]:
    """``tiny_spec(**overrides) -> Spec``: a short run of the tiny model on a slice of the
    shipped recipes (TINY_RUN, ``tiny_data``), writing to a fresh temporary directory.

    Overrides are Spec fields (``max_steps=4``); a section takes a dict merged into its
    defaults (``lora={"rank": 4}``), or a dotted key (``**{"lora.rank": 4}``); ``None``
    drops a TINY_RUN value, so the Spec's own default applies (``val_batches=None``).
    Dicts of overrides a file shares go first, applied in order before the keywords:
    ``tiny_spec(LONGER_RUN, max_steps=30)``.
    """
    def make(*shared: dict, **overrides: Any) -> Spec:
        flat = {"model": str(tiny_model), "data": str(tiny_data),
                "output_dir": str(tmp_path_factory.mktemp("run") / "run"), **TINY_RUN}
        for key, value in [kv for d in (*shared, overrides) for kv in d.items()]:
            if key in SECTIONS and isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return build_spec(overrides={k: str(v) if isinstance(v, Path) else v
                                     for k, v in flat.items() if v is not None})
    return make


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for `python -m mlx_tune` children: quiet, offline, deterministic."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


@pytest.fixture(scope="session")
def narrow_model(tiny_model, tmp_path_factory):
    """tiny-mistral's tokenizer on a 1-layer, 32-wide Mistral: a whole epoch of long rows
    costs seconds, and both backends load it from the same files."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    out = tmp_path_factory.mktemp("narrow")
    config = MistralConfig.from_pretrained(tiny_model)
    config.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture
def silent_server():
    """``http://127.0.0.1:PORT`` of a loopback server that accepts every connection and never
    sends a byte: a dead proxy or captive portal, for tests of clients that must not hang."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()
