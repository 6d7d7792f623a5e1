"""The MLX backend: mlx-lm models and LoRA layers, the compiled step, unified memory.

Model definitions, quantization, LoRA/DoRA layers and generation are mlx-lm's; this
module wires them to the backend Protocol (see base.py) and keeps the arrays.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_tune.backends.base import (AppliedLimits, EvalResult, MemoryLimits,
                                    MemoryReading, ModelInfo, StepResult, match_targets)
from mlx_tune.backends.common import (EMA, OPTIMIZER, RNG, TRAINABLE, adapted_layers,
                                      optimizer_args, refuse_full_quantized, state_undone,
                                      step_config, weights_swapped, with_prefix)
from mlx_tune.backends.mlx import chunked_loss
from mlx_tune.backends.mlx.base_model import load_base
from mlx_tune.backends.mlx.codec import MlxCodec
from mlx_tune.backends.mlx.collectives import MlxCollectives
from mlx_tune.backends.mlx.logps import row_logps
from mlx_tune.backends.mlx.memory import device_info, memory_limits
from mlx_tune.backends.mlx.step import CompiledStep, make_optimizer
from mlx_tune.config.schema import Spec
from mlx_tune.data.batch import Batch
from mlx_tune.files import atomic_file, atomic_write
from mlx_tune.models.tokenizer import load_tokenizer
from mlx_tune.system.memory import resident_bytes

def lora_keys(block: nn.Module, targets: Sequence[str]) -> list[str]:
    """Module paths inside a transformer block (e.g. ``self_attn.q_proj``) for the targets."""
    return match_targets([name for name, m in block.named_modules()
                          if isinstance(m, (nn.Linear, nn.QuantizedLinear))], targets)


def adapter_config(spec: Spec, keys: list[str], num_layers: int, model_dir: Path) -> dict:
    """mlx-lm's adapter_config.json, so ``mlx_lm.generate --adapter-path`` loads our output."""
    return {
        "fine_tune_type": spec.fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": {"rank": spec.lora.rank, "scale": spec.lora.scale,
                            "dropout": spec.lora.dropout, "keys": keys},
        "model": str(model_dir),
        "base_model": spec.model,
        "quantize": spec.quantize,
        "quantize_group_size": spec.quantize_group_size,
        "trainer": "mlx-tune",
    }


def arrays_of(batch: Batch) -> dict[str, mx.array]:
    """The batch's arrays by name: tokens, mask, and segments (packed) or ref_logps
    (precomputed reference) when it has them."""
    return {name: mx.array(value) for name, value in batch.arrays().items()}


def set_leaf(tree: Any, dotted: str, value: Any) -> None:
    """tree["a"]["0"]... = value for a key from tree_flatten ("a.0.b")."""
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value


class MLXBackend(MlxCollectives):
    """The backend Protocol on MLX; rank, world size and collectives come from
    ``MlxCollectives``."""

    name = "mlx"

    def __init__(self) -> None:
        super().__init__()
        self.codec = MlxCodec()

    # -- loading ---------------------------------------------------------------
    def load(self, spec: Spec, model_dir: Path) -> ModelInfo:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        self.spec, self.model_dir = spec, Path(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir, spec.trust_remote_code)
        model, config, bits = load_base(self.model_dir, quantize=spec.quantize,
                                        group_size=spec.quantize_group_size, dtype=spec.dtype,
                                        trust_remote_code=spec.trust_remote_code)
        # Every end-of-sequence id the model declares (generation_config.json included):
        # a chat model may end a turn with </s> as well as its template's end token.
        eos = config.get("eos_token_id")
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        refuse_full_quantized(spec, bits)  # a pre-quantized model's bits count too
        # The adapter's random init and LoRA dropout draw from here: seed first.
        mx.random.seed(spec.seed)
        layers = adapted_layers(spec, len(model.layers))
        self.keys: list[str] = []
        if spec.fine_tune_type == "full":
            model.unfreeze()
        else:
            model.freeze()
            self.keys = lora_keys(model.layers[0], spec.lora.targets)
            linear_to_lora_layers(model, layers,
                                  {"rank": spec.lora.rank, "scale": spec.lora.scale,
                                   "dropout": spec.lora.dropout, "keys": self.keys},
                                  use_dora=spec.fine_tune_type == "dora")
        if spec.gradient_checkpointing:
            from mlx_lm.tuner.trainer import grad_checkpoint
            grad_checkpoint(model.layers[0])
        self.model, self.num_layers = model, layers
        self.optimizer = make_optimizer(spec.optimizer, **optimizer_args(spec))
        config = step_config(spec, self.world_size, "mlx")
        if config.chunked_loss and not chunked_loss.supports(model):
            if spec.memory.chunked_loss:  # asked for by name: say why it cannot be
                chunked_loss.split_model(model)
            config = replace(config, chunked_loss=False)  # auto: the plain loss
        self.step_fn = CompiledStep(model, self.optimizer, config)
        model.train()
        total = sum(v.size for _, v in tree_flatten(model.parameters()))
        if bits:  # packed weights hold 32/bits values per uint32 element
            total = sum(v.size * (32 // bits if v.dtype == mx.uint32 else 1)
                        for _, v in tree_flatten(model.parameters()))
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        return ModelInfo(str(self.model_dir), total, trainable, len(model.layers), bits)

    # -- training ----------------------------------------------------------------
    def step(self, micro_batches: Sequence[Batch], lr: float, noise_std: float) -> StepResult:
        arrays = [arrays_of(b) for b in micro_batches]
        loss, ntok, norm, finite, count, sums = self.step_fn(arrays, lr, noise_std)
        metrics = {name: (sums[2 * i], sums[2 * i + 1])
                   for i, name in enumerate(self.step_fn.metric_names)}
        return StepResult(loss=loss, tokens=ntok, grad_norm=norm, finite=finite, count=count,
                          metrics=metrics)

    def score_rows(self, batch: Batch) -> np.ndarray:
        self.model.eval()
        try:
            arrays = arrays_of(batch)
            rows = row_logps(self.model, arrays["tokens"], arrays["mask"],
                             arrays.get("segments"), chunked=self.step_fn.config.chunked_loss)
            return np.array(mx.stop_gradient(rows.logps).astype(mx.float32))
        finally:
            self.model.train()

    def trial_step(self, micro_batch: Batch) -> int:
        # MLX arrays are immutable: the step rebinds the state, so the arrays themselves
        # are the copy.
        with state_undone(self.state_dict, self.load_state_dict, lambda a: a):
            mx.eval(self.step_fn.state)
            mx.reset_peak_memory()
            result = self.step([micro_batch], 0.0, 0.0)
            mx.eval(result.loss, self.step_fn.state)
            return mx.get_peak_memory()

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        self.model.eval()
        try:
            total = None
            for b in batches:
                vector = self.step_fn.eval_batch(arrays_of(b))
                total = vector if total is None else total + vector
                mx.eval(total)  # bound the graph: one batch of activations at a time
            if total is None:
                total = mx.zeros((2 + 2 * len(self.step_fn.eval_names),))
            if self.world_size > 1:
                total = mx.distributed.all_sum(total, stream=mx.cpu)
            return EvalResult.from_vector(total.tolist(), self.step_fn.eval_names)
        finally:
            self.model.train()

    def to_floats(self, values: Sequence[Any]) -> list[float]:
        lazy = [v for v in values if isinstance(v, mx.array)]
        if lazy:
            mx.eval(lazy)  # one sync for the whole report interval
        return [v.item() if isinstance(v, mx.array) else float(v) for v in values]

    def memory(self) -> MemoryReading:
        return MemoryReading(mx.get_active_memory(), mx.get_peak_memory(),
                             mx.get_cache_memory(), resident_bytes())

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def memory_limits(self, limits: MemoryLimits) -> AbstractContextManager[AppliedLimits]:
        return memory_limits(mx, limits, device_info(mx))

    def compiled_shapes(self) -> int:
        """Distinct input shapes the compiled step and evaluation have been called with."""
        return len(self.step_fn.shapes)

    def trainable_digest(self) -> str:
        """A hash of the trainable weights' bytes (the not-training guard compares two)."""
        h = hashlib.blake2b(digest_size=16)
        for name, value in tree_flatten(self.model.trainable_parameters()):
            h.update(name.encode())
            h.update(memoryview(np.array(mx.view(value, mx.uint8))))
        return h.hexdigest()

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict]:
        arrays: dict[str, Any] = {}
        arrays.update({TRAINABLE + k: v for k, v in tree_flatten(self.model.trainable_parameters())})
        arrays.update({OPTIMIZER + k: v for k, v in tree_flatten(self.optimizer.state)})
        arrays.update({EMA + k: v for k, v in tree_flatten(self.step_fn.ema)})
        arrays[RNG + "mlx"] = mx.random.state[0]
        return arrays, {"backend": "mlx", "optimizer": type(self.optimizer).__name__}

    def load_state_dict(self, arrays: dict[str, Any], meta: dict) -> None:
        self.model.load_weights(list(with_prefix(arrays, TRAINABLE).items()), strict=False)
        opt = with_prefix(arrays, OPTIMIZER)
        if {k for k, _ in tree_flatten(self.optimizer.state)} != set(opt):
            raise ValueError("checkpoint optimizer state does not match this optimizer "
                             f"({meta.get('optimizer')} in the checkpoint)")
        # Leaf by leaf, in place: the compiled step holds these very containers, and
        # rebuilding them would drop branches that hold no arrays.
        for key, value in opt.items():
            set_leaf(self.optimizer.state, key, value)
        if self.step_fn.ema:
            for key, value in with_prefix(arrays, EMA).items():
                set_leaf(self.step_fn.ema, key, value)
        if RNG + "mlx" in arrays:
            # The global key cannot be assigned, but seed(s) sets key = [s >> 32, s & 0xffffffff].
            hi, lo = (int(x) for x in arrays[RNG + "mlx"].tolist())
            mx.random.seed((hi << 32) | lo)
        mx.eval(self.step_fn.state)

    def ema_weights(self) -> AbstractContextManager[None]:
        """Evaluate (or save) with the EMA weights, then put the live ones back. The
        snapshot is the live arrays themselves: ``update`` rebinds, it never writes into
        them."""
        return weights_swapped(self.step_fn.ema.get("weights"),
                               self.model.trainable_parameters, self.model.update)

    # -- output ------------------------------------------------------------------
    def save_adapter(self, directory: Path) -> None:
        """adapters.safetensors + adapter_config.json in mlx-lm's format, atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = dict(tree_flatten(self.model.trainable_parameters()))
        mx.eval(weights)
        with atomic_file(directory / "adapters.safetensors") as fh:
            mx.save_safetensors(fh, weights, metadata={"format": "mlx"})
        config = adapter_config(self.spec, self.keys, self.num_layers, self.model_dir)
        atomic_write(directory / "adapter_config.json", json.dumps(config, indent=2))

    def load_adapter(self, directory: Path) -> None:
        """adapters.safetensors as save_adapter wrote it: one array per trainable parameter."""
        weights = mx.load(str(Path(directory) / "adapters.safetensors"))
        expected = dict(tree_flatten(self.model.trainable_parameters()))
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if missing or extra:
            raise ValueError(f"{directory}: the adapter does not fit this model ("
                             + (f"missing {missing[0]}" if missing else f"unknown {extra[0]}")
                             + f"; {len(missing)} missing, {len(extra)} unknown)")
        bad = [k for k, v in weights.items() if v.shape != expected[k].shape]
        if bad:
            raise ValueError(f"{directory}: {bad[0]} has shape {weights[bad[0]].shape}, the "
                             f"model's is {expected[bad[0]].shape}")
        self.model.load_weights(list(weights.items()), strict=False)
        mx.eval(self.model.parameters())

    def generate(self, messages: list[dict], max_tokens: int,
                 tools: list[dict] | None = None) -> str:
        from mlx_lm.generate import generate
        from mlx_lm.sample_utils import make_sampler
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=False, tools=tools or None)
        self.model.eval()
        try:
            tokenizer = TokenizerWrapper(self.tokenizer, eos_token_ids=self.eos_ids)
            return generate(self.model, tokenizer, prompt,
                            max_tokens=max_tokens, sampler=make_sampler(temp=0.0))
        finally:
            self.model.train()
