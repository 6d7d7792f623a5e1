"""The conformance kit: what every registered backend must do, checked the same way on
each (the numpy fake of the loop tests, MLX, torch). A new backend passes this file
before anything else; it is one package plus one ``register`` line (README, "Adding a
backend").

References are independent of the backend under test: the uninterrupted run for a
restored one, the trained model for its reloaded adapter, the mask for the token counts,
export/adapters.py's format detection for the adapter files.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mlx_tune.backends import registry
from mlx_tune.backends.base import (AppliedLimits, EvalResult, MemoryLimits,
                                    MemoryReading, ModelInfo, StepResult)
from mlx_tune.backends.launchers import LAUNCHERS
from mlx_tune.data.batch import Batch
from mlx_tune.export.adapters import detect_format
from tests.unit.training.test_loop import FakeBackend

HERE = "tests.model.test_backend_conformance"


class LoadableFake(FakeBackend):
    """The loop tests' numpy backend, built the registry's way: made empty, then loaded."""

    def __init__(self) -> None:  # noqa: D107 - FakeBackend's state comes with load()
        pass

    def load(self, spec, model_dir: Path) -> ModelInfo:
        FakeBackend.__init__(self, spec)
        return ModelInfo(str(model_dir), total_params=4, trainable_params=4, num_layers=1,
                         quantized_bits=None)

    def load_adapter(self, directory: Path) -> None:
        self.w = load_file(str(Path(directory) / "adapters.safetensors"))["w"]


def fake_generate(model_dir, adapter_dir, messages, max_tokens, tools=None) -> str:
    return "ok"


def fake_fuse(model_dir, adapter, output, spec, *, dequantize, log) -> None:
    raise NotImplementedError("the fake has no base model to fuse into")


class fake_memory:  # noqa: N801 - a module stand-in: the registry names a module here
    @staticmethod
    def device_memory():
        return None

    @staticmethod
    def held_memory() -> float:
        return 0.0


FAKE = registry.Registered(
    name="fake", framework="numpy", backend=f"{HERE}:LoadableFake",
    codec="mlx_tune.checkpoint.format:NumpyCodec", adapter_format="mlx", launcher="",
    fuse=f"{HERE}:fake_fuse", generate=f"{HERE}:fake_generate", memory=f"{HERE}:fake_memory",
    unfused_attention=False, quantizes_embeddings=False, full_saves_model=False)

NAMES = ["fake", *registry.names()]


@pytest.fixture(params=NAMES)
def entry(request, monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, "fake", FAKE)  # one line registers a backend
    found = registry.get(request.param)
    if not found.available():
        pytest.skip(f"{found.framework} is not installed")
    return found


def spec_for(entry, tiny_spec):
    # The fake is registered after the schema read the names: set it past the choices.
    spec = tiny_spec(lora={"rank": 4, "layers": 2, "dropout": 0.0}, batch_size=2, seed=5)
    return replace(spec, backend=entry.name)


def batches(n: int, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(3, 200, size=(2, 12)).astype(np.int32)
        mask = np.ones((2, 12), np.float32)
        mask[:, :4] = 0  # a prompt: positions that are not targets
        out.append(Batch(tokens, mask))
    return out


def loaded(entry, spec, tiny_model):
    backend = entry.make()
    info = backend.load(spec, tiny_model)
    assert isinstance(info, ModelInfo) and 0 < info.trainable_params <= info.total_params
    assert backend.name == entry.name and (backend.rank, backend.world_size) == (0, 1)
    return backend


def step(backend, batch: Batch, lr: float = 1e-2) -> list[float]:
    random.seed(7)  # the fake's gradients draw from Python's RNG, as a dropout would
    result = backend.step(batch.split(1), lr, 0.0)
    assert isinstance(result, StepResult)
    return backend.to_floats([result.loss, result.tokens, result.grad_norm, result.finite])


def test_the_entry_names_what_the_rest_of_the_code_reads(entry):
    assert entry.adapter_format in ("mlx", "peft")
    assert entry.launcher == "" or entry.launcher in LAUNCHERS
    assert callable(entry.load("backend"))
    codec = entry.make_codec()
    assert all(hasattr(codec, m) for m in ("is_array", "save_file", "load_file", "materialize"))
    assert list(inspect.signature(entry.load("fuse")).parameters) == [
        "model_dir", "adapter", "output", "spec", "dequantize", "log"]
    assert list(inspect.signature(entry.load("generate")).parameters)[:4] == [
        "model_dir", "adapter_dir", "messages", "max_tokens"]
    memory = entry.load("memory")
    device = memory.device_memory()
    assert device is None or (device[0] > 0 and isinstance(device[1], str))
    assert memory.held_memory() >= 0


def test_a_restored_backend_continues_exactly_as_the_uninterrupted_one(entry, tiny_model,
                                                                        tiny_spec, tmp_path):
    spec = spec_for(entry, tiny_spec)
    data = batches(3)
    reference = loaded(entry, spec, tiny_model)
    first = step(reference, data[0])
    loss, tokens, _, finite = first
    assert tokens == data[0].n_targets and finite == 1.0 and np.isfinite(loss)
    arrays, meta = reference.state_dict()
    codec = entry.make_codec()
    codec.materialize(list(arrays.values()))
    codec.save_file(arrays, str(tmp_path / "state.safetensors"))  # through the codec's file
    want = [step(reference, b) for b in data[1:]]

    restored = loaded(entry, spec, tiny_model)
    restored.load_state_dict(codec.load_file(str(tmp_path / "state.safetensors")), meta)
    assert [step(restored, b) for b in data[1:]] == want


def test_evaluation_counts_the_mask_s_targets(entry, tiny_model, tiny_spec):
    backend = loaded(entry, spec_for(entry, tiny_spec), tiny_model)
    data = batches(2, seed=1)
    result = backend.evaluate(data)
    assert isinstance(result, EvalResult)
    assert result.tokens == sum(b.n_targets for b in data)  # 2 rows x 8 targets, twice
    assert np.isfinite(result.loss_sum) and result.loss_sum > 0
    # sft's token metrics, each a sum over the same targets
    correct, counted = result.metrics["accuracy"]
    assert counted == result.tokens and 0 <= correct <= result.tokens
    with backend.ema_weights():
        pass
    m = backend.memory()
    assert isinstance(m, MemoryReading) and 0 <= m.active <= max(m.peak, m.active)
    assert m.cache >= 0 and m.footprint >= m.active and backend.compiled_shapes() >= 0


def test_row_scores_are_the_evaluation_s_log_probs_row_by_row(entry, tiny_model, tiny_spec):
    # score_rows (the precomputed reference's pass) against evaluate's sft loss sum, and
    # each row scored alone, padded wider, against its score in the batch.
    backend = loaded(entry, spec_for(entry, tiny_spec), tiny_model)
    batch = batches(1, seed=2)[0]
    scores = backend.score_rows(batch)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32
    assert scores.shape == (2,) and (scores < 0).all()
    assert -scores.sum() == pytest.approx(backend.evaluate([batch]).loss_sum, rel=1e-5)
    wide = Batch(np.zeros((2, 16), np.int32), np.zeros((2, 16), np.float32))
    wide.tokens[:, :12], wide.mask[:, :12] = batch.tokens[::-1], batch.mask[::-1]
    assert backend.score_rows(wide) == pytest.approx(scores[::-1], rel=1e-5)


def test_the_trial_step_measures_and_changes_nothing(entry, tiny_model, tiny_spec):
    # The first-step memory check (training/first_step.py): a step whose effects are
    # undone, so the steps after it match a backend's that never ran it, bit for bit.
    spec = spec_for(entry, tiny_spec)
    plain, tried = loaded(entry, spec, tiny_model), loaded(entry, spec, tiny_model)
    with tried.memory_limits(MemoryLimits(cache=64 * 2**20, limit_fraction=0.85)) as applied:
        assert isinstance(applied, AppliedLimits) and applied.notes is not None
        assert tried.trial_step(batches(1, seed=9)[0]) > 0
    for backend in (plain, tried):
        for b in batches(2):
            step(backend, b)
    want, got = plain.state_dict()[0], tried.state_dict()[0]
    assert want.keys() == got.keys()
    for key in want:  # tolist: exact values from numpy, MLX and torch alike
        assert want[key].tolist() == got[key].tolist(), key


def test_the_saved_adapter_is_in_the_registered_format_and_reloads(entry, tiny_model,
                                                                   tiny_spec, tmp_path):
    spec = spec_for(entry, tiny_spec)
    trained = loaded(entry, spec, tiny_model)
    for b in batches(2):
        step(trained, b, lr=5e-2)
    trained.save_adapter(tmp_path / "adapters")
    assert detect_format(tmp_path / "adapters") == entry.adapter_format
    probe = batches(1, seed=3)
    want = trained.evaluate(probe).loss_sum

    fresh = loaded(entry, spec, tiny_model)
    assert fresh.evaluate(probe).loss_sum != want  # training moved the weights
    fresh.load_adapter(tmp_path / "adapters")
    assert fresh.evaluate(probe).loss_sum == pytest.approx(want, rel=1e-5)

    messages = [{"role": "user", "content": "Give me a recipe for soup"}]
    text = entry.load("generate")(tiny_model, tmp_path / "adapters", messages, 6)
    assert isinstance(text, str)
    assert text == trained.generate(messages, 6)  # the command's path is the training one's
