"""Every backend by name, and what the rest of the code reads about it.

Adding a backend is one package under ``mlx_tune/backends/`` implementing the
``Backend`` Protocol (base.py) and one ``register(Registered(...))`` line below. Nothing
outside ``backends/`` branches on a backend's name: the schema's choices, ``auto``, the
launcher check, the checkpoint codec, the adapter format, the planner's byte costs,
fusing and generation all come from here.

Implementations are named as ``"module:attribute"`` and imported on first use, so that
asking about a backend imports neither its framework nor the rest of the package (the
spec's schema reads the names).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from mlx_tune.errors import SpecError


@dataclass(frozen=True)
class Registered:
    name: str
    framework: str  # the module whose import says this backend can run here ('auto')
    backend: str  # -> a callable making an unloaded Backend (base.py's Protocol)
    codec: str  # -> the ArrayCodec class its checkpoints are written with
    adapter_format: str  # export/adapters.py's name of the format its adapters are in
    launcher: str  # backends/launchers.py's name of the launcher that starts its ranks
    fuse: str  # -> fuse(model_dir, adapter, output, spec, *, dequantize, log)
    generate: str  # -> generate(model_dir, adapter_dir, messages, max_tokens, tools) -> str
    memory: str  # a module: device_memory() -> (bytes, what) or None; held_memory() -> bytes
    # The memory planner's byte costs (training/planner.py):
    unfused_attention: bool  # trains with matmul-softmax-matmul: B*heads*L*L kept per layer
    quantizes_embeddings: bool  # quantization covers the embeddings and output head too
    # A full fine-tune's adapters/ holds a whole model (the base for evaluate and fuse)
    # rather than the trained arrays alone.
    full_saves_model: bool

    def load(self, what: str) -> Any:
        """The object ``getattr(self, what)`` names, imported now."""
        module, _, attribute = getattr(self, what).partition(":")
        loaded = importlib.import_module(module)
        return getattr(loaded, attribute) if attribute else loaded

    def make(self) -> Any:
        return self.load("backend")()

    def make_codec(self) -> Any:
        return self.load("codec")()

    def available(self) -> bool:
        try:
            importlib.import_module(self.framework)
            return True
        except ImportError:
            return False


BACKENDS: dict[str, Registered] = {}


def register(entry: Registered) -> None:
    BACKENDS[entry.name] = entry


def names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def get(name: str) -> Registered:
    """The backend called ``name``; an unknown name is refused, naming the known ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise SpecError(f"backend: unknown backend {name!r}; expected one of "
                        f"{', '.join(('auto',) + names())}") from None


register(Registered(
    name="mlx", framework="mlx.core",
    backend="mlx_tune.backends.mlx.backend:MLXBackend",
    codec="mlx_tune.backends.mlx.codec:MlxCodec", adapter_format="mlx",
    launcher="mlx.launch", fuse="mlx_tune.backends.mlx.fuse:fuse",
    generate="mlx_tune.backends.mlx.generation:generate_with_adapter",
    memory="mlx_tune.backends.mlx.memory",
    # MLX trains with unfused attention: mx.fast.scaled_dot_product_attention falls back
    # to matmul-softmax-matmul under autodiff (on Metal too, where that is faster).
    unfused_attention=True, quantizes_embeddings=True, full_saves_model=False))
register(Registered(
    name="torch", framework="torch",
    backend="mlx_tune.backends.torch.backend:make_backend",
    codec="mlx_tune.backends.torch.codec:TorchCodec", adapter_format="peft",
    launcher="torchrun", fuse="mlx_tune.backends.torch.fuse:fuse",
    generate="mlx_tune.backends.torch.generation:generate_with_adapter",
    memory="mlx_tune.backends.torch.memory",
    # SDPA is fused on CUDA (no L^2 term); bitsandbytes quantizes the blocks' linears only.
    unfused_attention=False, quantizes_embeddings=False, full_saves_model=True))
