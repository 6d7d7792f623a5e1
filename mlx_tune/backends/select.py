"""Choosing and constructing a backend by name ('auto', 'mlx', 'torch').

Framework imports happen inside the functions, so asking which backend to use
imports neither MLX nor torch unless that backend is the one built.
"""

from __future__ import annotations

from mlx_tune.backends.base import Backend


def select_backend(name: str) -> str:
    """'auto' -> mlx wherever MLX imports (Apple Silicon, MLX's Linux/CUDA builds), else
    torch."""
    if name != "auto":
        return name
    try:
        import mlx.core  # noqa: F401
        return "mlx"
    except ImportError:
        return "torch"


def make_backend(name: str) -> Backend:
    if name == "mlx":
        from mlx_tune.backends.mlx.backend import MLXBackend
        return MLXBackend()
    from mlx_tune.backends.torch.ddp import init_from_env
    init_from_env()  # under torchrun: join the process group before the backend looks
    from mlx_tune.backends.torch.backend import TorchBackend
    return TorchBackend()
