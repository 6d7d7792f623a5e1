"""What both backends do alike, written once: the spec checks of ``load()``, the
optimizer's hyper-parameters and the step's configuration, dtype names, checkpoint key
names, the EMA weight swap and the array header of a broadcast.

Nothing here imports a framework: each backend passes in its own pieces.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, TypeVar

from mlx_tune.backends.base import Collectives, StepConfig
from mlx_tune.config.schema import Spec, SpecError
from mlx_tune.config.spec import preference_settings
from mlx_tune.objectives import get_objective

# Checkpoint array names: "<prefix><name in the framework's own tree>".
TRAINABLE = "trainable/"  # the trainable weights (LoRA/DoRA adapters, or all of them)
OPTIMIZER = "optimizer/"  # the optimizer's state (moments, step counts)
EMA = "ema/"  # EMA copies of the trainable weights (when EMA is on)
RNG = "rng/"  # the framework's random generator state(s)

# The spec's dtype names (besides "auto"), the same attribute names in mlx.core and torch.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def framework_dtypes(framework: Any) -> dict[str, Any]:
    """The spec's dtype names -> ``framework``'s dtypes (``mlx.core`` or ``torch``)."""
    return {name: getattr(framework, name) for name in DTYPE_NAMES}


def with_prefix(arrays: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The arrays whose name starts with ``prefix``, the prefix removed."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def refuse_full_quantized(spec: Spec, bits: int | None) -> None:
    """A full fine-tune updates every weight, which a quantized base cannot hold."""
    if bits and spec.fine_tune_type == "full":
        raise SpecError("fine_tune_type: full cannot train a quantized base; "
                         "use lora or dora, or drop 'quantize'")


def adapted_layers(spec: Spec, blocks: int) -> int:
    """How many of the model's ``blocks`` (the last ones) get adapters."""
    layers = blocks if spec.lora.layers == -1 else spec.lora.layers
    if layers > blocks:
        raise SpecError(f"lora.layers is {layers} but the model has {blocks} "
                         "blocks (-1 = all)")
    return layers


def optimizer_args(spec: Spec) -> dict[str, Any]:
    """The keyword arguments of both backends' ``make_optimizer``."""
    return {"learning_rate": spec.learning_rate, "weight_decay": spec.weight_decay,
            "betas": spec.betas, "eps": spec.eps, "momentum": spec.momentum}


def step_config(spec: Spec, world_size: int, backend: str = "mlx") -> StepConfig:
    return StepConfig(grad_clip=spec.grad_clip, label_smoothing=spec.label_smoothing,
                      ema_decay=spec.ema.decay if spec.ema.enabled else None,
                      world_size=world_size, gradient_noise=spec.gradient_noise.eta > 0,
                      chunked_loss=chunked_loss(spec, backend),
                      objective=get_objective(spec.objective),
                      settings=preference_settings(spec))


CHUNK_LOGITS = 1 << 23  # logits elements per chunk of the chunked loss: 32 MB in float32


def chunk_positions(vocab: int, chunk_logits: int = CHUNK_LOGITS) -> int:
    """Positions per chunk of the chunked loss: ~``chunk_logits`` logits, at least one.
    Larger chunks re-read the output head fewer times (once per chunk and pass: what
    bounds its speed on a GPU with a 128k vocabulary); smaller ones hold less."""
    return max(1, chunk_logits // vocab)


def chunked_loss(spec: Spec, backend: str) -> bool:
    """memory.chunked_loss as given, else (auto) on where it costs no recomputation: MLX
    with a frozen output head (LoRA, QLoRA, DoRA), whose chunks compute the hidden-state
    gradient with the forward. torch's chunks and a trained head's recompute the head's
    product in the backward pass (benchmarks/memory.py measures the cost)."""
    if spec.memory.chunked_loss is not None:
        return spec.memory.chunked_loss
    return backend == "mlx" and spec.fine_tune_type != "full"


T = TypeVar("T")


@contextmanager
def weights_swapped(ema: T | None, snapshot: Callable[[], T],
                    load: Callable[[T], None]) -> Iterator[None]:
    """Run the block with the EMA weights loaded, then put the live ones back (nothing
    happens without EMA weights). ``snapshot`` must return a copy that ``load`` cannot
    overwrite."""
    if not ema:
        yield
        return
    live = snapshot()
    load(ema)
    try:
        yield
    finally:
        load(live)


@contextmanager
def state_undone(state_dict: Callable[[], tuple[dict[str, Any], dict]],
                 load_state_dict: Callable[[dict[str, Any], dict], None],
                 copy: Callable[[Any], Any]) -> Iterator[None]:
    """Whatever the block does to the training state (weights, optimizer, EMA, random
    generators) is undone on exit, through the checkpoint's own state_dict and
    load_state_dict (the path that exact resume already proves bit for bit). ``copy``:
    how to keep an array the block may write into (torch updates in place; MLX arrays
    are immutable, so there the array itself will do)."""
    arrays, meta = state_dict()
    saved = {k: copy(v) for k, v in arrays.items()}
    try:
        yield
    finally:
        load_state_dict(saved, meta)


def broadcast_header(comm: Collectives, arrays: Mapping[str, Any] | None) -> list:
    """``[name, shape, dtype name]`` of rank 0's arrays, on every rank: what the other
    ranks allocate before ``broadcast_arrays`` fills them. The dtype name is the same
    attribute of ``mlx.core`` and of ``torch`` (``bfloat16``, ``int64``...), except
    MLX's ``bool``, which ``mlx.core`` spells ``bool_``."""
    header = None
    if comm.rank == 0:
        header = [[name, list(a.shape), str(a.dtype).rsplit(".", 1)[-1]]
                  for name, a in (arrays or {}).items()]
    data = json.dumps(header).encode() if comm.rank == 0 else b""
    return json.loads(comm.broadcast_bytes(data).decode())
