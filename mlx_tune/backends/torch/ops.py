"""``ArrayOps`` for PyTorch: what the objectives (``mlx_tune/objectives``) compute with."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchOps:
    def float32(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32)

    def log_sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(x)

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def relu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)

    def log(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)

    def log1p(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x)

    def expm1(self, x: torch.Tensor) -> torch.Tensor:
        return torch.expm1(x)

    def maximum(self, x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.clamp(x, min=value)

    def minimum(self, x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.clamp(x, max=value)

    def where(self, condition: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(condition, x, y)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()

    def ones_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)

    def stop_gradient(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


TORCH_OPS = TorchOps()
