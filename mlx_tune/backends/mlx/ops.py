"""``objectives.base.ArrayOps`` on MLX arrays (this module is the ops object)."""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn


def log_sigmoid(x: Any) -> Any:
    return nn.log_sigmoid(x)


def sigmoid(x: Any) -> Any:
    return mx.sigmoid(x)


def relu(x: Any) -> Any:
    return mx.maximum(x, 0.0)


def exp(x: Any) -> Any:
    return mx.exp(x)


def log(x: Any) -> Any:
    return mx.log(x)


def log1p(x: Any) -> Any:
    return mx.log1p(x)


def clip(x: Any, low: Optional[float], high: Optional[float]) -> Any:
    return mx.clip(x, low, high)


def where(cond: Any, a: Any, b: Any) -> Any:
    return mx.where(cond, a, b)


def sum(x: Any) -> Any:  # noqa: A001 - the Protocol's name
    return mx.sum(x)


def mean(x: Any) -> Any:
    return mx.mean(x)


def maximum(a: Any, b: Any) -> Any:
    return mx.maximum(a, b)


def stop_gradient(x: Any) -> Any:
    return mx.stop_gradient(x)


def zeros_like(x: Any) -> Any:
    return mx.zeros_like(x)


def float32(x: Any) -> Any:
    return x.astype(mx.float32)
