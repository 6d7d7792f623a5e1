"""The memory planner: estimate peak training memory; propose micro-batch and accumulation.

Used by `gradient_accumulation_steps: auto` (training/setup.py) and `mlx-tune plan`
(commands/plan.py, the command line around it).

Computed from the model's ``config.json`` alone (no weights are read), so planning a 7B
run takes a second anywhere. Peak of one optimizer step = weights + grads + optimizer
state + update temporaries + activations kept for the backward + logits + temporaries.

Assumptions, and why. The MLX terms are calibrated on ``mx.get_peak_memory()`` of real
steps (tiny-model variants: 2-16 layers, hidden 128-512, vocab 1k-8k, length 128-1024,
fp32/bf16, LoRA/QLoRA/full, with and without dropout and checkpointing: all within 16%);
the per-token terms (``K_TRANSIENT``, ``LOGIT_COPIES``, the chunked loss's) are refitted at
Hermes-7B dimensions (benchmarks/memory.py: 1 layer, 512 and 1,024 tokens, float32,
chunked and not, and 2 layers at 512: all within 3%; README "Memory at 7B dimensions"):

* Attention: MLX *trains* with unfused attention (``mx.fast.scaled_dot_product_attention``
  falls back to matmul-softmax-matmul under autodiff, on Metal too, where that is faster),
  so each layer keeps B*heads*L*L probabilities. The torch backend's SDPA is fused on
  CUDA: no L^2 term there (its other terms reuse the MLX calibration). Which backend
  does which is its registry entry's ``unfused_attention`` (backends/registry.py).
* Per layer and token: ~``K_HIDDEN`` hidden-size vectors (residuals, norm outputs,
  attention output, ...) + q, k, v + 3 MLP-width vectors, in the activation dtype. LoRA
  adapters are float32: a half-precision base adds float32 copies of their inputs, and
  dropout a masked copy (+ mask) per adapted module.
* Logits: the loss runs in float32 on B*L*vocab and its backward holds ~``LOGIT_COPIES``
  such arrays at once; with a 32k vocabulary this is often the largest single item.
  With the chunked loss (``memory.chunked_loss``, on by default for MLX LoRA-family
  runs: backends/common.py) it holds the lesser of ``CHUNKED_FULL_COPIES`` full logits
  (few chunks) and ``CHUNK_COPIES`` chunks' logits (many: MLX runs ahead of the arrays
  it frees), plus the hidden-state gradient it keeps (benchmarks/memory.py).
* Gradient checkpointing keeps each layer's input and recomputes ``CKPT_LAYERS`` layers'
  worth at a time (the recomputation overlaps the backward).
* Optimizer state has the parameter's dtype (zeros_like(param) in both frameworks);
  AdamW/Adam 2 slots, SGD 1 with momentum, Adafactor factored rows + columns. The update
  writes new params and state while the old ones are still referenced (the non-finite
  step guard keeps them): they count twice.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from mlx_tune.backends import registry
from mlx_tune.backends.common import chunk_positions, chunked_loss
from mlx_tune.config.schema import Spec

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETY = 0.75  # plan for this fraction of the detected memory

# Calibration (see the module docstring).
K_HIDDEN = 8.5  # hidden-size vectors kept per layer and token
LOGIT_COPIES = 5.0  # float32 [B*L, vocab] arrays alive at the loss (7B dims: 4.3-5.1)
K_TRANSIENT = 4.5  # [B*L, hidden + intermediate] temporaries around the first backward layer
ATTN_TRANSIENT = 2.0  # attention-probability-sized temporaries (backward of one layer)
CKPT_LAYERS = 2.0
FROZEN_LAYER_SHARE = 0.5  # layers below the first adapted one: forward only, partly overlapped
QUANT_EXTRA = 2.0  # hidden vectors per layer and token: quantized matmuls copy inputs
CHUNKED_FULL_COPIES = 2.0  # chunked loss, few chunks: full float32 logits alive at once
CHUNK_COPIES = 20.0  # chunked loss, many chunks: chunks' logits alive at once


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = False
    dtype_bytes: int = 2  # as stored; the spec's dtype overrides
    quant_bits: int | None = None  # pre-quantized (MLX) weights
    quant_group: int = 64

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        cfg = dict(config.get("text_config") or {}, **config)  # multimodal wrappers nest it
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        q = cfg.get("quantization") or {}
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        return cls(hidden=h, layers=int(cfg["num_hidden_layers"]), heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or h // heads),
                   intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   dtype_bytes=DTYPE_BYTES.get(dtype, 2), quant_bits=q.get("bits"),
                   quant_group=int(q.get("group_size", 64)))

    def modules(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in a block, by spec target name."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, \
            self.kv_heads * self.head_dim
        return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h),
                "gate": (h, i), "up": (h, i), "down": (i, h)}

    def params(self) -> int:
        block = sum(a * b for a, b in self.modules().values()) + 2 * self.hidden
        heads = 1 if self.tie_embeddings else 2
        return heads * self.vocab * self.hidden + self.layers * block + self.hidden


@dataclass
class Estimate:
    """Bytes, except the counts. ``total`` is the predicted peak of one optimizer step."""
    micro_batch: int
    length: int
    accumulation: int
    params: int
    trainable: int
    weights: float
    grads_optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads_optimizer + self.activations + self.logits


def _trainable_shapes(shape: ModelShape, spec: Spec) -> list[tuple[int, ...]]:
    if spec.fine_tune_type == "full":
        block = [(o, i) for i, o in shape.modules().values()] + [(shape.hidden,)] * 2
        heads = [(shape.vocab, shape.hidden)] * (1 if shape.tie_embeddings else 2)
        return heads + block * shape.layers + [(shape.hidden,)]
    r = spec.lora.rank
    adapted = shape.layers if spec.lora.layers == -1 else min(spec.lora.layers, shape.layers)
    one = []
    for target in spec.lora.targets:
        i, o = shape.modules()[target]
        one += [(i, r), (r, o)] + ([(o,)] if spec.fine_tune_type == "dora" else [])
    return one * adapted


def _optimizer_slots(spec: Spec, shapes: list[tuple[int, ...]]) -> int:
    """Optimizer-state elements for these parameter shapes."""
    n = sum(math.prod(s) for s in shapes)
    if spec.optimizer in ("adamw", "adam"):
        return 2 * n
    if spec.optimizer == "sgd":
        return n if spec.momentum > 0 else 0
    return sum(s[0] + s[1] if len(s) == 2 else s[0] for s in shapes)  # adafactor: factored


def weight_bytes(shape: ModelShape, bits: int | None, d: int, backend: str = "mlx") -> float:
    """Base weights; quantized matrices cost bits/8 per weight plus a scale and a bias (in
    the model dtype) per group. Some backends quantize the embeddings and output head too
    (MLX), others only the linear layers of the blocks (bitsandbytes): the registry says."""
    total = shape.params()
    if not bits:
        return total * d
    matrices = shape.layers * sum(a * b for a, b in shape.modules().values())
    if registry.get(backend).quantizes_embeddings:
        matrices += shape.vocab * shape.hidden * (1 if shape.tie_embeddings else 2)
    per = bits / 8 + 2 * d / shape.quant_group
    return matrices * per + (total - matrices) * d


def estimate(shape: ModelShape, spec: Spec, micro_batch: int, length: int,
             accumulation: int = 1, backend: str = "mlx") -> Estimate:
    """Predicted peak of one optimizer step with this micro-batch and sequence length."""
    d = DTYPE_BYTES.get(spec.dtype, shape.dtype_bytes)
    bits = spec.quantize or shape.quant_bits
    full = spec.fine_tune_type == "full"
    shapes = _trainable_shapes(shape, spec)
    trainable = sum(math.prod(s) for s in shapes)
    pbytes = d if full else 4  # LoRA parameters are float32
    slots = _optimizer_slots(spec, shapes)
    weights = weight_bytes(shape, bits, d, backend) + (0 if full else trainable * pbytes)
    # grads (+ the running sum when accumulating) + state, then the update's new params
    # and state while the old ones are still referenced.
    grads_opt = pbytes * (trainable * (1 + (accumulation > 1)) + slots + trainable + slots)
    if spec.optimizer == "adafactor":  # its update builds full-size squared/scaled gradients
        grads_opt += pbytes * 2 * trainable

    h, i, V, n = shape.hidden, shape.intermediate, shape.vocab, shape.layers
    mods = shape.modules()
    T, L = micro_batch * length, length
    probs = micro_batch * shape.heads * L * L * d if registry.get(backend).unfused_attention else 0
    layer = T * d * (K_HIDDEN * h + mods["q"][1] + 2 * mods["k"][1] + 3 * i) + probs
    if not full:
        targets = [mods[t][0] for t in spec.lora.targets]
        if spec.lora.dropout > 0:  # each adapter masks its own copy of the input
            layer += T * sum(targets) * (d + 1 + (4 if d != 4 else 0))
        elif d != 4:  # one float32 copy per distinct input (q/k/v and gate/up share theirs)
            layer += T * 4 * sum({t: mods[t][0] for t in spec.lora.targets
                                  if t in ("q", "o", "gate", "down")}.values())
    if bits:
        layer += T * d * QUANT_EXTRA * h
    adapted = n if full or spec.lora.layers == -1 else min(spec.lora.layers, n)
    if spec.gradient_checkpointing:
        kept = adapted * T * h * d + CKPT_LAYERS * layer
    else:
        kept = adapted * layer + FROZEN_LAYER_SHARE * (n - adapted) * layer
    activations = kept + ATTN_TRANSIENT * probs + K_TRANSIENT * T * d * (h + i)
    logits = loss_bytes(T, V, h, d, chunked_loss(spec, backend))
    return Estimate(micro_batch, length, accumulation, shape.params(), trainable, weights,
                    grads_opt, activations, logits)


def loss_bytes(tokens: int, vocab: int, hidden: int, d: int, chunked: bool) -> float:
    """What the loss holds at its peak: full float32 logits (and their copies), or, chunked,
    a bounded number of chunks' logits plus the float32 hidden-state gradient it keeps."""
    full = tokens * vocab * (4 * LOGIT_COPIES + (d if d != 4 else 0))
    if not chunked:
        return full
    chunk = min(tokens, chunk_positions(vocab)) * vocab * 4
    held = min(CHUNKED_FULL_COPIES * tokens * vocab * 4, CHUNK_COPIES * chunk)
    return min(full, held + 4 * tokens * hidden)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def propose(shape: ModelShape, spec: Spec, budget: float, backend: str = "mlx",
            world_size: int = 1) -> tuple[Estimate, bool]:
    """The fewest accumulation steps (largest micro-batch) whose peak fits the budget,
    keeping micro_batch * accumulation * world_size == batch_size; (estimate, fits)."""
    best, per_rank = None, max(spec.batch_size // world_size, 1)
    for steps in divisors(per_rank):
        best = estimate(shape, spec, per_rank // steps, spec.max_length, steps, backend)
        if best.total <= budget:
            return best, True
    return best, False


# -- memory detection and the budget ---------------------------------------------------

def detect_memory(backend: str = "mlx") -> tuple[float, str]:
    """(bytes, what they are): the backend's accelerator memory (Metal's recommended
    working set, CUDA device memory), else the RAM available."""
    held = 0.0
    try:
        memory = registry.get(backend).load("memory")
        device = memory.device_memory()
        if device is not None:
            return device
        held = memory.held_memory()  # what this process already holds is part of the plan
    except Exception:  # noqa: BLE001 - no framework, or no device info: fall back to RAM
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0 + held, "available RAM"
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "RAM"


def budget_bytes(spec: Spec, memory_gb: float | None = None,
                 backend: str = "mlx") -> tuple[float, str]:
    """spec.memory_budget_gb as given, else SAFETY x (memory_gb or the detected memory)."""
    if spec.memory_budget_gb:
        return spec.memory_budget_gb * GB, "memory_budget_gb"
    if memory_gb:
        return SAFETY * memory_gb * GB, f"{SAFETY:.0%} of --memory-gb {memory_gb:g}"
    total, what = detect_memory(backend)
    return SAFETY * total, f"{SAFETY:.0%} of {total / GB:.1f} GB {what}"


def plan_accumulation(spec: Spec, model_dir: Path, backend: str, world_size: int) -> int:
    """gradient_accumulation_steps for ``auto``: a divisor of the per-rank batch (the whole
    per-rank batch, micro-batch 1, when even that does not fit: the most frugal choice).
    ``backend`` and ``world_size`` are the running backend's: each of the ``world_size``
    data-parallel ranks holds batch_size / world_size sequences per step."""
    shape = ModelShape.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
    budget, _ = budget_bytes(spec, backend=backend)
    return propose(shape, spec, budget, backend, world_size)[0].accumulation
