"""torch tensors <-> safetensors files, for the checkpoint manager (``ArrayCodec``)."""

from __future__ import annotations

import torch


class TorchCodec:
    name = "torch"

    def is_array(self, value: object) -> bool:
        return isinstance(value, torch.Tensor)

    def materialize(self, arrays: list) -> None:
        pass  # eager: save_file copies to the host

    def save_file(self, arrays: dict[str, object], path: str) -> None:
        from safetensors.torch import save

        host, seen = {}, set()
        for k, v in arrays.items():
            t = v.detach().cpu().contiguous()
            if t.data_ptr() in seen:  # safetensors refuses tensors sharing memory
                t = t.clone()
            seen.add(t.data_ptr())
            host[k] = t
        # Serialize in memory, then plain Python I/O, so a full disk is an
        # OSError(ENOSPC) like NumpyCodec's, not a wrapped Rust error.
        data = save(host)
        with open(path, "wb") as f:
            f.write(data)

    def load_file(self, path: str) -> dict[str, object]:
        from safetensors.torch import load

        with open(path, "rb") as f:  # owns its memory: nothing stays mmapped
            return load(f.read())

    def release(self) -> None:
        pass
