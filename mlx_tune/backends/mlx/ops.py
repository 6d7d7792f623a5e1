"""``ArrayOps`` for MLX: what the objectives (``mlx_tune/objectives``) compute with.

Every op stays lazy and differentiable, so a loss built from them compiles into the
step's graph like the cross-entropy it replaces.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class MlxOps:
    def float32(self, x: mx.array) -> mx.array:
        return x.astype(mx.float32)

    def log_sigmoid(self, x: mx.array) -> mx.array:
        return nn.log_sigmoid(x)

    def sigmoid(self, x: mx.array) -> mx.array:
        return mx.sigmoid(x)

    def relu(self, x: mx.array) -> mx.array:
        return mx.maximum(x, 0.0)

    def exp(self, x: mx.array) -> mx.array:
        return mx.exp(x)

    def log(self, x: mx.array) -> mx.array:
        return mx.log(x)

    def log1p(self, x: mx.array) -> mx.array:
        return mx.log1p(x)

    def expm1(self, x: mx.array) -> mx.array:
        return mx.expm1(x)

    def maximum(self, x: mx.array, value: float) -> mx.array:
        return mx.maximum(x, value)

    def minimum(self, x: mx.array, value: float) -> mx.array:
        return mx.minimum(x, value)

    def where(self, condition: mx.array, x: mx.array, y: mx.array) -> mx.array:
        return mx.where(condition, x, y)

    def sum(self, x: mx.array) -> mx.array:
        return x.sum()

    def ones_like(self, x: mx.array) -> mx.array:
        return mx.ones_like(x)

    def stop_gradient(self, x: mx.array) -> mx.array:
        return mx.stop_gradient(x)


MLX_OPS = MlxOps()
