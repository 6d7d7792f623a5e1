"""The backend registry: names in, implementations out; unknown names refused by name."""

from __future__ import annotations

import dataclasses

import pytest

from mlx_tune.backends import registry
from mlx_tune.backends.select import make_backend, select_backend
from mlx_tune.config.schema import Spec, SpecError
from mlx_tune.config.spec import build_spec


def test_the_spec_s_backend_choices_are_the_registry_s():
    choices = {f.name: f for f in dataclasses.fields(Spec)}["backend"].metadata["choices"]
    assert choices == ("auto", *registry.names()) and {"mlx", "torch"} <= set(choices)
    with pytest.raises(SpecError, match="backend.*jax.*auto, mlx, torch"):
        build_spec(None, {"backend": "jax"})


@pytest.mark.parametrize("call", [select_backend, make_backend, registry.get])
def test_an_unknown_name_is_refused_by_name(call):
    # select_backend used to turn any name other than "mlx" into torch, silently.
    with pytest.raises(SpecError, match="unknown backend 'jax'; expected one of auto, mlx, torch"):
        call("jax")


def test_auto_is_the_first_registered_backend_whose_framework_imports(monkeypatch):
    first = registry.BACKENDS["mlx"]
    monkeypatch.setitem(registry.BACKENDS, "mlx", dataclasses.replace(
        first, framework="a_framework_that_is_not_installed"))
    assert select_backend("auto") == "torch"
    assert select_backend("mlx") == "mlx"  # asked by name: no probing


def test_names_are_imported_only_when_used():
    entry = registry.Registered(
        name="later", framework="json", backend="json:JSONDecoder", codec="json:JSONEncoder",
        adapter_format="peft", launcher="", fuse="json:dumps", generate="json:loads",
        memory="json", unfused_attention=False, quantizes_embeddings=False,
        full_saves_model=False)
    assert entry.available() and entry.load("memory").__name__ == "json"
    assert type(entry.make()).__name__ == "JSONDecoder"
