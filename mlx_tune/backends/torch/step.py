"""The PyTorch training step: the same arithmetic as ``backends/mlx/step.py``, eagerly.

One optimizer step = ``accumulate`` (forward + backward of each micro-batch; the loss is
the objective's *sum*, so gradients of micro-batches add up exactly), then ``update``:
divide by the step's total count (target tokens for sft, pairs...), global norm, finite
guard, clipping, gradient noise, optimizer, EMA. Read it side by side with
``CompiledStep._update``; what is differentiated is ``logps.py``.

Where the frameworks force a difference, the meaning is kept:
- MLX selects the old weights/optimizer state with ``where`` when a step is non-finite;
  torch optimizers update in place, so the update is simply not run. That costs one
  host sync per step (the finite flag), which a whole forward/backward dwarfs.
- A trainable tensor that got no gradient counts as a zero gradient (MLX's grads tree
  is always complete), so weight decay and momentum still apply to it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mlx_tune.data.batch import Batch
from mlx_tune.backends.base import Metrics, StepConfig
from mlx_tune.backends.common import OPTIMIZER
from mlx_tune.backends.torch.chunked_loss import HiddenTap
from mlx_tune.backends.torch.logps import (TOKEN_METRICS, as_tensor, causal_logits, eval_sums,
                                           objective_eval, objective_terms, row_logps,
                                           token_loss_sums)

__all__ = ["TorchStep", "causal_logits", "eval_sums", "load_optimizer_arrays",
           "make_optimizer", "optimizer_arrays", "row_logps", "to_device", "token_loss_sums"]


def to_device(batch: Batch, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tokens, mask, positions restarting per example or None when not packed)."""
    arrays = device_arrays(batch, device)
    return arrays["tokens"], arrays["mask"], arrays.get("positions")


def device_arrays(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """tokens, mask, and positions restarting per example (packed), ref_logps
    (precomputed reference) and labels (kto) when the batch has them."""
    from mlx_tune.data.packing import segment_positions
    out = {"tokens": torch.from_numpy(np.asarray(batch.tokens, dtype=np.int64)),
           "mask": torch.from_numpy(np.asarray(batch.mask, dtype=np.float32))}
    if batch.segments is not None:
        out["positions"] = torch.from_numpy(segment_positions(batch.segments))
    if batch.ref_logps is not None:
        out["ref_logps"] = torch.from_numpy(np.asarray(batch.ref_logps, dtype=np.float32))
    if batch.labels is not None:  # kto
        out["labels"] = torch.from_numpy(np.asarray(batch.labels, dtype=np.float32))
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


class TorchStep:
    """Owns the optimizer step and the EMA copies of the trainable weights.

    ``params`` maps names to the trainable parameters (the checkpoint's names);
    ``forward`` is the model or its ``torch.compile``d version; ``autocast`` returns the
    mixed-precision context of every forward (a no-op on CPU); ``model`` is the peft
    model whose adapter the reference pass switches off."""

    def __init__(self, forward: Callable, params: dict[str, torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer, config: StepConfig, device: torch.device,
                 autocast: Callable[[], AbstractContextManager] = nullcontext,
                 model: torch.nn.Module | None = None):
        self.forward, self.params, self.optimizer = forward, params, optimizer
        self.model = forward if model is None else model
        self.config, self.device, self.autocast = config, device, autocast
        # The chunked loss reads the decoder's hidden states through a hook on ``model``
        # (the unwrapped one: ``forward`` may be DDP or torch.compile around it).
        self.tap = HiddenTap(model if model is not None else forward) \
            if config.chunked_loss else None
        self.ema: dict[str, torch.Tensor] = {}
        if config.ema_decay is not None:
            self.ema = {k: p.detach().clone() for k, p in params.items()}
        self.eval_names: tuple[str, ...] = TOKEN_METRICS  # until an evaluation says
        # Every (rows, width) fed to ``forward``: torch.compile specialises on shapes as
        # mx.compile does, so both backends report the same count.
        self.shapes: set[tuple[int, ...]] = set()

    def accumulate(self, micro_batches: Sequence[Batch]) -> tuple:
        """Forward + backward of each micro-batch; gradients of the loss *sums* add up in
        ``.grad``. Returns (loss_sum, count, target tokens, metrics as (sum, count))."""
        zero = lambda: torch.zeros((), device=self.device)  # noqa: E731
        loss_sum, count, ntok = zero(), zero(), zero()
        metrics: Metrics = {}
        ddp = self.ddp()
        for i, batch in enumerate(micro_batches):
            arrays = device_arrays(batch, self.device)
            self.shapes.add(tuple(arrays["tokens"].shape))
            # Under DDP, gradients are reduced with the step's last micro-batch only.
            last = i == len(micro_batches) - 1
            with (ddp.no_sync() if ddp is not None and not last else nullcontext()):
                with self.autocast():
                    terms, n = objective_terms(self.forward, self.model, self.config, arrays,
                                               self.tap)
                # A loss cut off from the weights has no graph: its gradient is zero, which
                # the not-training guard reports by name instead of autograd's error.
                if terms.loss_sum.requires_grad:
                    terms.loss_sum.backward()
            loss_sum += terms.loss_sum.detach()
            count += as_tensor(terms.count, self.device)
            ntok += n.detach()
            for name, (s, c) in terms.metrics.items():
                old = metrics.get(name, (zero(), zero()))
                metrics[name] = (old[0] + as_tensor(s, self.device),
                                 old[1] + as_tensor(c, self.device))
        return loss_sum, count, ntok, metrics

    def ddp(self) -> Any:
        """The DistributedDataParallel wrapper in ``forward`` (maybe compiled), if any:
        it sums gradients across ranks during backward (see ddp.py)."""
        from torch.nn.parallel import DistributedDataParallel
        module = getattr(self.forward, "_orig_mod", self.forward)
        return module if isinstance(module, DistributedDataParallel) else None

    @torch.no_grad()
    def update(self, loss_sum: torch.Tensor, count: torch.Tensor, lr: float,
               noise_std: float, metrics: Metrics | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        params = list(self.params.values())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if cfg.world_size > 1:
            # Data parallel: every rank adds its sums; the division below makes the
            # result the mean over the *global* batch's count (as MLX does).
            # Gradients are summed here unless DDP already did it during backward.
            import torch.distributed as dist
            sums = [t for pair in (metrics or {}).values() for t in pair]
            for t in [loss_sum, count, *sums, *(grads if self.ddp() is None else [])]:
                dist.all_reduce(t)
        denom = count.clamp(min=1.0)
        torch._foreach_div_(grads, denom)
        norm = torch.linalg.vector_norm(torch.stack(
            torch._foreach_norm(grads, 2, dtype=torch.float32)))
        finite = torch.isfinite(loss_sum) & torch.isfinite(norm)
        if bool(finite):  # the one host sync of a step
            if cfg.grad_clip > 0:
                factor = (cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
                torch._foreach_mul_(grads, factor)
            if cfg.gradient_noise:
                for g in grads:
                    g.add_(noise_std * torch.randn(g.shape, device=g.device).to(g.dtype))
            for group in self.optimizer.param_groups:
                group["lr"] = lr  # the loop owns the schedule
            self.optimizer.step()
            if self.ema:
                d = cfg.ema_decay
                for k, p in self.params.items():
                    self.ema[k].mul_(d).add_(p.detach().to(self.ema[k].dtype), alpha=1 - d)
        # A non-finite step leaves weights, optimizer state and EMA exactly as they were.
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / denom, norm, finite.float()

    def __call__(self, micro_batches: Sequence[Batch], lr: float, noise_std: float) -> tuple:
        """(loss, target tokens, grad norm, finite, count, metrics), as MLX's step."""
        loss_sum, count, ntok, metrics = self.accumulate(micro_batches)
        if self.config.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(ntok)
        loss, norm, finite = self.update(loss_sum, count, lr, noise_std, metrics)
        return loss, ntok, norm, finite, count, metrics

    def score_rows(self, batch: Batch, inference: Any) -> np.ndarray:
        """Each row's target log-prob sum (``Backend.score_rows``), under ``inference``
        (the backend's evaluation mode and no_grad)."""
        arrays = device_arrays(batch, self.device)
        with inference, self.autocast():
            rows = row_logps(self.forward, arrays["tokens"], arrays["mask"],
                             arrays.get("positions"), tap=self.tap)
        return rows.logps.detach().float().cpu().numpy()

    def eval_batch(self, batch: Batch) -> tuple[torch.Tensor, tuple[str, ...]]:
        """Evaluation sums as one vector (loss_sum, count, then each metric's sum and
        count), and the metric names."""
        arrays = device_arrays(batch, self.device)
        self.shapes.add(tuple(arrays["tokens"].shape))
        with torch.no_grad(), self.autocast():
            if self.config.objective.name == "sft":
                return (eval_sums(self.forward, arrays["tokens"], arrays["mask"],
                                  arrays.get("positions"), self.tap), TOKEN_METRICS)
            vector, self.eval_names = objective_eval(self.forward, self.model, self.config,
                                                     arrays, self.tap)
            return vector, self.eval_names


def make_optimizer(name: str, params: list[torch.nn.Parameter], *, learning_rate: float,
                   weight_decay: float, betas: Sequence[float], eps: float,
                   momentum: float) -> torch.optim.Optimizer:
    """The spec's optimizer, with the hyper-parameters the MLX ``make_optimizer`` uses:
    AdamW's decay is decoupled (``p -= lr*wd*p``) on both sides, Adam has none, SGD's
    is L2 (added to the gradient), Adafactor's is 0."""
    betas = (float(betas[0]), float(betas[1]))
    # One fused kernel for all tensors (the HF Trainer's default, adamw_torch_fused):
    # same formula, a fraction of the per-tensor op overhead (0.5 vs 2.5 ms a step for
    # the tiny model's 28 LoRA tensors on a CPU). Parity with MLX is measured with it.
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") for p in params) or None
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, betas=betas, eps=eps,
                                 weight_decay=weight_decay, fused=fused)
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate, betas=betas, eps=eps, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=momentum,
                               weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    raise ValueError(f"unknown optimizer {name!r}")


def optimizer_arrays(optimizer: torch.optim.Optimizer,
                     names: dict[torch.nn.Parameter, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer/<param>/<key>`` tensors, plus which of them were Python scalars (such
    as Adafactor's int step) so they come back as such. Nothing is pickled."""
    arrays: dict[str, torch.Tensor] = {}
    scalars: dict[str, str] = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            name = f"{OPTIMIZER}{names[p]}/{key}"
            if isinstance(value, torch.Tensor):
                arrays[name] = value.detach()
            elif isinstance(value, (bool, int, float)):
                arrays[name] = torch.tensor(value)
                scalars[name] = type(value).__name__
            elif value is not None:  # e.g. SGD's momentum_buffer without momentum
                raise TypeError(f"optimizer state {name} is a {type(value).__name__}; "
                                "only tensors and numbers can be checkpointed")
    return arrays, scalars


def load_optimizer_arrays(optimizer: torch.optim.Optimizer, arrays: dict[str, Any],
                          params: dict[str, torch.nn.Parameter], scalars: dict) -> None:
    casts = {"bool": bool, "int": int, "float": float}
    # torch keeps Adam's step count on the CPU, unless fused/capturable (on the device).
    step_on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    state: dict[torch.nn.Parameter, dict] = {}
    for name, value in arrays.items():
        if not name.startswith(OPTIMIZER):
            continue
        pname, key = name[len(OPTIMIZER):].rsplit("/", 1)
        if pname not in params:
            raise ValueError(f"checkpoint optimizer state names '{pname}', which is not a "
                             "trainable tensor of this model")
        p = params[pname]
        if name in scalars:
            value = casts[scalars[name]](value.item())
        elif key != "step" or step_on_device:
            value = value.to(p.device, copy=True)  # never share memory with the caller
        else:
            value = value.clone()
        state.setdefault(p, {})[key] = value
    optimizer.state.clear()
    for p, st in state.items():
        optimizer.state[p] = st
