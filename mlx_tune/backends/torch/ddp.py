"""PyTorch data parallel under torchrun: the process group and DistributedDataParallel.

    torchrun --nproc_per_node 2 -m mlx_tune train --backend torch -c spec.yaml

``init_from_env`` joins the process group torchrun describes in the environment (gloo
on the CPU, nccl on CUDA), before ``TorchBackend`` reads its rank. ``wrap`` puts the
model in DDP with a communication hook that *sums* gradients across ranks instead of
averaging them: the step (``step.TorchStep.update``) divides by the global
number of target tokens, exactly as the MLX step does after its all_sum, so 2 ranks x
batch 4 equal 1 rank x batch 8. ``TorchStep`` finds the wrapper (``TorchStep.ddp``): it
skips DDP's all-reduce for every micro-batch but a step's last (``no_sync``), and its own
all-reduce of the gradients.

Wiring, in ``TorchBackend.load`` (before ``torch.compile``, which then wraps the DDP
module)::

    self.forward = model
    if self.world_size > 1:
        from mlx_tune.backends.torch.ddp import wrap
        self.forward = wrap(model, self.device)
    if spec.torch_compile:
        self.forward = torch.compile(self.forward)
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from mlx_tune.backends.base import timeout_from_env
from mlx_tune.backends.launchers import torchrun_world


def init_from_env() -> None:
    """Join torchrun's process group (a no-op outside torchrun, for 1 process, or when
    it is already joined). Collectives time out after MLX_TUNE_DIST_TIMEOUT seconds."""
    if not dist.is_available() or dist.is_initialized() or torchrun_world() <= 1:
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    seconds = timeout_from_env()
    kwargs = {"timeout": timedelta(seconds=max(seconds, 60.0))} if seconds > 0 else {}
    dist.init_process_group("nccl" if cuda else "gloo", **kwargs)


def _sum_hook(group, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP's all-reduce without its division by the world size (a ``GradBucket`` in, a
    future of the summed buffer out)."""
    fut = dist.all_reduce(bucket.buffer(), group=group or dist.group.WORLD,
                          async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DDP: trainable parameters broadcast from rank 0 once, gradients summed
    over ranks during backward. Frozen (possibly 4-bit) base weights and buffers are left
    alone: every rank loaded the same files."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    # No collective in forward: the evaluation shards of the ranks may differ in number.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})  # torch < 2.13
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              **no_buffer_sync)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp

