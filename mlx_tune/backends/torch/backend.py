"""The PyTorch backend: the same spec on NVIDIA GPUs (and, slowly, on any CPU).

Models come from transformers, LoRA/DoRA from peft, QLoRA from bitsandbytes; the step
(``step.py``) means exactly what the MLX step means. Everything the loop sees (batches,
StepResult, EvalResult, checkpoint arrays) is the same as on MLX. The pieces around it:
``loading.py`` (the base model), ``fourbit.py`` (keeping 4-bit layers trainable),
``codec.py`` (checkpoint arrays), ``collectives.py`` and ``ddp.py`` (torchrun),
``generation.py``, ``threads.py`` (CPU threads).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from mlx_tune.backends.base import (AppliedLimits, EvalResult, MemoryLimits,
                                    MemoryReading, ModelInfo, StepResult)
from mlx_tune.backends.common import (EMA, RNG, TRAINABLE, adapted_layers, optimizer_args,
                                      refuse_full_quantized, state_undone, step_config,
                                      weights_swapped, with_prefix)
from mlx_tune.backends.torch.codec import TorchCodec
from mlx_tune.backends.torch.collectives import TorchCollectives
from mlx_tune.backends.torch.fourbit import FourBitGuard
from mlx_tune.backends.torch.generation import greedy
from mlx_tune.backends.torch.memory import TorchMemory
from mlx_tune.backends.torch.loading import (SIDECAR, decoder_layers, default_device, load_base,
                                             lora_keys, stored_numel)
from mlx_tune.backends.torch.step import (TorchStep, load_optimizer_arrays, make_optimizer,
                                          optimizer_arrays)
from mlx_tune.backends.torch.threads import default_threads
from mlx_tune.config.schema import Spec
from mlx_tune.data.batch import Batch
from mlx_tune.files import atomic_write, fsync_dir, fsync_file
from mlx_tune.models.tokenizer import load_tokenizer


class TorchBackend(TorchCollectives):
    """The backend Protocol on PyTorch; rank, world size and collectives come from
    ``TorchCollectives``."""

    name = "torch"

    def __init__(self) -> None:
        super().__init__(default_device())
        self.codec = TorchCodec()
        self._memory = TorchMemory(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    # -- loading ---------------------------------------------------------------
    def load(self, spec: Spec, model_dir: Path) -> ModelInfo:
        self.spec, self.model_dir = spec, Path(model_dir)
        torch.set_num_threads(spec.torch_threads or default_threads())
        refuse_full_quantized(spec, spec.quantize)  # before minutes of loading
        if spec.quantize and spec.quantize_group_size != 64:
            warnings.warn("torch backend: bitsandbytes NF4 uses blocks of 64; "
                          f"quantize_group_size={spec.quantize_group_size} applies to MLX only")
        self.tokenizer = load_tokenizer(self.model_dir, spec.trust_remote_code)
        model = load_base(self.model_dir, quantize=spec.quantize, dtype=spec.dtype,
                          device=self.device, trust_remote_code=spec.trust_remote_code)
        blocks = len(decoder_layers(model))
        layers = adapted_layers(spec, blocks)
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        # The adapter's random init and LoRA dropout draw from here: seed first.
        torch.manual_seed(spec.seed)
        self.keys: list[str] = []
        if spec.fine_tune_type == "full":
            model.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model
            self.keys = lora_keys(decoder_layers(model)[0], spec.lora.targets)
            if spec.gradient_checkpointing:
                model.enable_input_require_grads()
            with warnings.catch_warnings():  # peft calls a deprecated transformers API
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                model = get_peft_model(model, LoraConfig(
                    r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                    target_modules=self.keys, use_dora=spec.fine_tune_type == "dora", bias="none",
                    layers_to_transform=None if layers == blocks
                    else list(range(blocks - layers, blocks)), task_type="CAUSAL_LM"))
        self.model, self.num_layers = model, layers
        self.guard = FourBitGuard(model)
        self.forward = model
        if self.world_size > 1:  # torchrun: DDP sums gradients across ranks in backward
            from mlx_tune.backends.torch.ddp import wrap
            self.forward = wrap(model, self.device)
        if spec.torch_compile:
            import torch._dynamo as dynamo
            dynamo.config.suppress_errors = True  # fall back to eager where it fails
            self.forward = torch.compile(self.forward)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = make_optimizer(spec.optimizer, list(self.params.values()),
                                        **optimizer_args(spec))
        cuda_amp = self.device.type == "cuda" and spec.dtype in ("auto", "bfloat16")
        self.step_fn = TorchStep(
            self.forward, self.params, self.optimizer,
            step_config(spec, self.world_size, "torch"),
            self.device, autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if cuda_amp else nullcontext, model=model)
        model.train()
        total = sum(stored_numel(p) for p in model.parameters())
        trainable = sum(p.numel() for p in self.params.values())
        return ModelInfo(str(self.model_dir), total, trainable, blocks, spec.quantize)

    # -- training ----------------------------------------------------------------
    def step(self, micro_batches: Sequence[Batch], lr: float, noise_std: float) -> StepResult:
        loss, ntok, norm, finite, count, metrics = self.step_fn(micro_batches, lr, noise_std)
        self._memory.trim()
        return StepResult(loss=loss, tokens=ntok, grad_norm=norm, finite=finite, count=count,
                          metrics=metrics)

    def score_rows(self, batch: Batch) -> np.ndarray:
        return self.step_fn.score_rows(batch, self.guard.inference(self.model))

    def trial_step(self, micro_batch: Batch) -> int:
        # The optimizer and the parameters are updated in place: keep copies.
        with state_undone(self.state_dict, self.load_state_dict, lambda t: t.clone()):
            self.reset_peak_memory()
            self.to_floats([self.step([micro_batch], 0.0, 0.0).loss])
            return self.memory().peak

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        with self.guard.inference(self.model):
            total, names = None, self.step_fn.eval_names
            for b in batches:
                vector, names = self.step_fn.eval_batch(b)
                total = vector if total is None else total + vector
            if total is None:
                total = torch.zeros(2 + 2 * len(names), device=self.device)
            if self.world_size > 1:
                dist.all_reduce(total)
            return EvalResult.from_vector(total.tolist(), names)

    def to_floats(self, values: Sequence[Any]) -> list[float]:
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if not tensors:
            return [float(v) for v in values]
        # One device->host copy for the whole report interval.
        host = iter(torch.stack([t.detach().reshape(()).double() for t in tensors]).tolist())
        return [next(host) if isinstance(v, torch.Tensor) else float(v) for v in values]

    def memory(self) -> MemoryReading:
        return self._memory.reading()

    def reset_peak_memory(self) -> None:
        self._memory.reset_peak()

    def memory_limits(self, limits: MemoryLimits) -> AbstractContextManager[AppliedLimits]:
        return self._memory.limits(limits)

    def compiled_shapes(self) -> int:
        """Distinct input shapes the model's forward has been called with in steps and
        evaluation (torch.compile, like mx.compile, specialises on them)."""
        return len(self.step_fn.shapes)

    @torch.no_grad()
    def trainable_digest(self) -> str:
        """A hash of the trainable weights' bytes (the not-training guard compares two)."""
        h = hashlib.blake2b(digest_size=16)
        for name, p in self.params.items():
            h.update(name.encode())
            h.update(p.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
        return h.hexdigest()

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict]:
        """Flat tensors (live references: save them before the next step) + JSON meta."""
        arrays: dict[str, Any] = {TRAINABLE + k: p.detach() for k, p in self.params.items()}
        opt, scalars = optimizer_arrays(self.optimizer, {p: k for k, p in self.params.items()})
        arrays.update(opt)
        arrays.update({EMA + k: v for k, v in self.step_fn.ema.items()})
        arrays[RNG + "torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            arrays[RNG + "cuda"] = torch.cuda.get_rng_state(self.device)
        return arrays, {"backend": "torch", "optimizer": type(self.optimizer).__name__,
                        "optimizer_scalars": scalars}

    @torch.no_grad()
    def load_state_dict(self, arrays: dict[str, Any], meta: dict) -> None:
        if meta.get("optimizer", type(self.optimizer).__name__) != type(self.optimizer).__name__:
            raise ValueError("checkpoint optimizer state does not match this optimizer "
                             f"({meta.get('optimizer')} in the checkpoint)")
        trainable, ema, rng = (with_prefix(arrays, p) for p in (TRAINABLE, EMA, RNG))
        missing = [k for k in self.params if k not in trainable]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensor(s), "
                             f"e.g. {missing[0]}")
        for k, p in self.params.items():
            p.copy_(trainable[k])
        load_optimizer_arrays(self.optimizer, arrays, self.params,
                              meta.get("optimizer_scalars", {}))
        for k, e in self.step_fn.ema.items():
            if k in ema:
                e.copy_(ema[k])
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu())
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)

    def ema_weights(self) -> AbstractContextManager[None]:
        """Evaluate (or save) with the EMA weights, then put the live ones back. The
        parameters are written in place (the optimizer holds them), so the snapshot is
        a copy."""
        return weights_swapped(self.step_fn.ema, self._snapshot, self._copy_in)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def _copy_in(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, p in self.params.items():
            p.copy_(tensors[k])

    # -- output ------------------------------------------------------------------
    def save_adapter(self, directory: Path) -> None:
        """peft's format (adapter_config.json + adapter_model.safetensors; a full
        fine-tune: the whole model, ``save_pretrained``), plus our small sidecar that
        says how to rebuild the base (quantization). Each file is swapped in atomically:
        transformers and peft write into a temporary directory next to ``directory``,
        whose files are made durable, then renamed into place; the sidecar comes last."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.model.save_pretrained(str(tmp))
            if self.spec.fine_tune_type == "full":
                self.tokenizer.save_pretrained(str(tmp))
            for f in sorted(tmp.iterdir()):
                fsync_file(f)
                os.replace(f, directory / f.name)
            fsync_dir(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        atomic_write(directory / SIDECAR, json.dumps({
            "trainer": "mlx-tune", "backend": "torch",
            "fine_tune_type": self.spec.fine_tune_type,
            "quantize": self.spec.quantize, "dtype": self.spec.dtype,
            "base_model": self.spec.model, "model": str(self.model_dir),
            "num_layers": self.num_layers, "keys": self.keys}, indent=2))

    @torch.no_grad()
    def load_adapter(self, directory: Path) -> None:
        """adapter_model.safetensors as save_adapter (peft) wrote it, through peft's own
        loader; a full fine-tune's directory is a whole model, loaded as the base instead."""
        if self.spec.fine_tune_type == "full":
            raise ValueError(f"{directory}: a full fine-tune is a whole model; load it as "
                             "the base model instead")
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        state = load_file(str(Path(directory) / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(self.model, state)
        missing = [k for k in result.missing_keys if k in self.params]
        if missing or result.unexpected_keys:
            raise ValueError(f"{directory}: the adapter does not fit this model ("
                             + (f"missing {missing[0]}" if missing
                                else f"unknown {result.unexpected_keys[0]}") + ")")

    def generate(self, messages: list[dict], max_tokens: int,
                 tools: list[dict] | None = None) -> str:
        with self.guard.inference(self.model):
            return greedy(self.model, self.tokenizer, messages, max_tokens, self.device,
                          tools=tools)


def make_backend() -> TorchBackend:
    """The registry's constructor: under torchrun, join the process group before the
    backend reads its rank."""
    from mlx_tune.backends.torch.ddp import init_from_env
    init_from_env()
    return TorchBackend()
