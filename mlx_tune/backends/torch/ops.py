"""``objectives.base.ArrayOps`` on torch tensors (this module is the ops object)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F


def log_sigmoid(x: Any) -> Any:
    return F.logsigmoid(x)


def sigmoid(x: Any) -> Any:
    return torch.sigmoid(x)


def relu(x: Any) -> Any:
    return torch.relu(x)


def exp(x: Any) -> Any:
    return torch.exp(x)


def log(x: Any) -> Any:
    return torch.log(x)


def log1p(x: Any) -> Any:
    return torch.log1p(x)


def clip(x: Any, low: Optional[float], high: Optional[float]) -> Any:
    return torch.clamp(x, low, high)


def where(cond: Any, a: Any, b: Any) -> Any:
    return torch.where(cond, a, b)


def sum(x: Any) -> Any:  # noqa: A001 - the Protocol's name
    return torch.sum(x)


def mean(x: Any) -> Any:
    return torch.mean(x)


def maximum(a: Any, b: Any) -> Any:
    return torch.maximum(a, torch.as_tensor(b, dtype=a.dtype, device=a.device))


def stop_gradient(x: Any) -> Any:
    return x.detach()


def zeros_like(x: Any) -> Any:
    return torch.zeros_like(x)


def float32(x: Any) -> Any:
    return x.float()
