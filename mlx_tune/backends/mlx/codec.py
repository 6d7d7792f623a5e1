"""mlx.core arrays <-> safetensors files, for the checkpoint manager (``ArrayCodec``)."""

from __future__ import annotations

import mlx.core as mx


class MlxCodec:
    name = "mlx"

    def is_array(self, value: object) -> bool:
        return isinstance(value, mx.array)

    def materialize(self, arrays: list) -> None:
        # One eval for the whole group lets MLX share work across the graph.
        if arrays:
            mx.eval(*arrays)

    def save_file(self, arrays: dict[str, object], path: str) -> None:
        mx.save_safetensors(path, arrays)

    def load_file(self, path: str) -> dict[str, object]:
        loaded = mx.load(path)
        # mx.load is lazy: evaluate now so no array stays bound to the file.
        mx.eval(*loaded.values())
        return loaded

    def release(self) -> None:
        mx.clear_cache()
