"""torch.distributed's collectives: the ``Collectives`` half of the backend Protocol.

torchrun starts the ranks and ``ddp.init_from_env`` joins the process group (gloo on
the CPU, nccl on CUDA) before the backend reads its rank. nccl only moves CUDA tensors,
so the collectives run on the backend's device there, and on the CPU under gloo.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from mlx_tune.backends.common import broadcast_header


class TorchCollectives:
    """Rank, world size and the collectives, on torchrun's process group (a single
    process when none was joined)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rank, self.world_size = 0, 1
        if dist.is_available() and dist.is_initialized():  # torchrun
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def wire_device(self) -> torch.device | str:
        """Where collectives run: the device for nccl, the CPU for gloo."""
        return self.device if dist.get_backend() == "nccl" else "cpu"

    def all_sum_ints(self, values: Sequence[int]) -> list[int]:
        if self.world_size <= 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.int64, device=self.wire_device())
        dist.all_reduce(t)
        return [int(v) for v in t.tolist()]

    def broadcast_bytes(self, data: bytes) -> bytes:
        if self.world_size <= 1:
            return data
        (size,) = self.all_sum_ints([len(data) if self.rank == 0 else 0])
        raw = (np.frombuffer(data, dtype=np.uint8).copy() if self.rank == 0
               else np.zeros(size, dtype=np.uint8))
        t = torch.from_numpy(raw).to(self.wire_device())
        dist.broadcast(t, src=0)
        return data if self.rank == 0 else t.cpu().numpy().tobytes()

    def broadcast_arrays(self, arrays: dict[str, Any] | None) -> dict[str, Any]:
        """A real broadcast moves the bits as they are. One tensor at a time; the other
        ranks get CPU tensors, where the codec's arrays live."""
        if self.world_size <= 1:
            return dict(arrays or {})
        device, out = self.wire_device(), {}
        for name, shape, dtype_name in broadcast_header(self, arrays):
            dtype = getattr(torch, dtype_name)
            t = (arrays[name].to(device) if self.rank == 0
                 else torch.zeros(shape, dtype=dtype, device=device))
            dist.broadcast(t, src=0)
            out[name] = arrays[name] if self.rank == 0 else t.cpu()
        return out
