"""The run specification: every setting, its default, and validation.

One frozen tree of dataclasses describes a run. It is built from defaults, then a
YAML file, then command-line flags (later wins), and validated *before* any model
loads, so a typo costs a second instead of a model download. Errors are one line
and name the file, line and key, and what was allowed.

Nested groups (``lora``, ``ema``, ...) are nested mappings in YAML and
dash-joined flags on the command line (``lora.rank`` <-> ``--lora-rank``).
"""

from __future__ import annotations

import dataclasses
import math
import difflib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from mlx_tune.config import mlx_lm


class SpecError(ValueError):
    """A spec that cannot run; the message is one line meant for the user."""


def _f(default: Any, help: str, *, low: float | None = None, high: float | None = None,
       choices: tuple | None = None, flag: str | None = None) -> Any:
    """A dataclass field carrying its help text and allowed range."""
    meta = {"help": help, "low": low, "high": high, "choices": choices, "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_AUGMENT_TEMPLATES = ["Create a recipe: {text}", "Recipe for: {text}",
                             "{text}", "Please help me with this: {text}"]


@dataclass(frozen=True)
class LoraSpec:
    rank: int = _f(8, "LoRA rank r", low=1)
    alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha/rank", low=0)
    dropout: float = _f(0.05, "dropout on the LoRA input", low=0, high=0.99)
    layers: int = _f(-1, "adapt the last N transformer blocks (-1 = all)", low=-1)
    targets: list = _f(list(LORA_TARGETS), "modules to adapt, among q,k,v,o,gate,up,down",
                       choices=LORA_TARGETS)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class RestartsSpec:
    t_0: int = _f(500, "cosine_restarts: steps in the first period (T_0)", low=1)
    t_mult: int = _f(1, "cosine_restarts: period multiplier after each restart (T_mult)", low=1)


@dataclass(frozen=True)
class OneCycleSpec:
    max_lr: Optional[float] = _f(None, "onecycle: peak learning rate (default: learning_rate)", low=0)
    pct_start: float = _f(0.3, "onecycle: fraction of steps spent rising", low=0, high=1)
    anneal_strategy: str = _f("cos", "onecycle: annealing shape", choices=("cos", "linear"))


@dataclass(frozen=True)
class EmaSpec:
    enabled: bool = _f(False, "keep an exponential moving average of the trainable weights",
                       flag="ema")
    decay: float = _f(0.9999, "EMA decay per optimizer step", low=0, high=1)
    use_for_eval: bool = _f(True, "evaluate and pick the best checkpoint with the EMA weights")


@dataclass(frozen=True)
class GradientNoiseSpec:
    eta: float = _f(0.0, "gradient noise variance eta/(1+step)^gamma (0 = off)", low=0)
    gamma: float = _f(0.55, "gradient noise decay exponent", low=0)


@dataclass(frozen=True)
class QualitySpec:
    start: Optional[float] = _f(None, "minimum record quality at epoch 0 (unset = no filter)",
                                low=0, high=1)
    end: float = _f(0.75, "minimum record quality once the ramp is over", low=0, high=1)
    ramp_epochs: int = _f(3, "epochs over which the minimum rises from start to end", low=0)


@dataclass(frozen=True)
class AugmentationSpec:
    enabled: bool = _f(False, "rewrite user turns with instruction templates", flag="augmentation")
    prob: float = _f(0.3, "probability that a record's user turn is rewritten", low=0, high=1)
    templates: list = _f(DEFAULT_AUGMENT_TEMPLATES, "templates with a {text} placeholder")
    templates_file: Optional[str] = _f(None, "file with one template per line (overrides templates)")


@dataclass(frozen=True)
class EarlyStoppingSpec:
    enabled: bool = _f(True, "stop runs that plateau or blow up", flag="early-stopping")
    monitor: str = _f("train_loss", "what the plateau rule watches",
                      choices=("train_loss", "val_loss", "none"))
    patience: int = _f(5, "plateau checks without improvement before stopping", low=1)
    min_delta: float = _f(0.01, "improvement that resets the plateau counter", low=0)
    check_every: int = _f(50, "steps between training-loss plateau checks", low=1)
    loss_window: int = _f(50, "steps in the training-loss moving average", low=1)
    val_patience: int = _f(5, "evaluations without improvement before stopping (monitor: val_loss)",
                           low=1)
    val_min_delta: float = _f(0.0, "validation improvement that resets its counter", low=0)
    grad_spike_threshold: float = _f(1000.0, "gradient norm counted as a spike", low=0)
    grad_spike_patience: int = _f(3, "consecutive spikes that stop the run", low=1)
    max_nonfinite_steps: int = _f(10, "consecutive skipped non-finite steps that stop the run",
                                  low=1)
    warmup: int = _f(50, "steps during which no rule triggers", low=0)


@dataclass(frozen=True)
class CurriculumStage:
    until_epoch: int = _f(1, "this stage applies to epochs < until_epoch", low=1)
    max_tokens: Optional[int] = _f(None, "keep records of at most this many tokens", low=1)
    max_turns: Optional[int] = _f(None, "keep records of at most this many user turns", low=1)
    max_difficulty: Optional[int] = _f(None, "keep records whose difficulty is at most this", low=0)


@dataclass(frozen=True)
class Spec:
    # -- model ---------------------------------------------------------------
    model: Optional[str] = _f(None, "Hugging Face id, local directory, or alias from configs/models.yaml")
    backend: str = _f("auto", "training backend (auto: mlx where MLX imports, else torch)",
                      choices=("auto", "mlx", "torch"))
    fine_tune_type: str = _f("lora", "what is trained", choices=("lora", "dora", "full"))
    quantize: Optional[int] = _f(None, "quantize the base on load to this many bits (QLoRA)",
                                 choices=(None, 4, 8))
    quantize_group_size: int = _f(64, "quantization group size", choices=(32, 64, 128))
    dtype: str = _f("auto", "dtype of base weights and activations (auto: as stored)",
                    choices=("auto", "float32", "bfloat16", "float16"))
    trust_remote_code: bool = _f(False, "let the tokenizer/model run code shipped with the model")
    lora: LoraSpec = field(default_factory=LoraSpec)
    # -- data ----------------------------------------------------------------
    data: Optional[str] = _f(None, "directory with train.jsonl (+ valid.jsonl or val.jsonl)")
    max_length: int = _f(1024, "truncate sequences longer than this many tokens", low=2)
    mask_prompt: bool = _f(True, "train on assistant answers only")
    val_split: Optional[float] = _f(None, "carve this fraction of train as validation when there "
                                    "is no validation file", low=0, high=0.5)
    streaming: bool = _f(False, "read train.jsonl in one pass per epoch through a shuffle buffer")
    shuffle_buffer: int = _f(10000, "records in the streaming shuffle buffer", low=1)
    bucket_widths: str = _f("auto", "padded widths: auto (at most 8, chosen from the train "
                            "lengths: bounded compiled shapes) or align32 (every multiple of "
                            "32, unbounded)", choices=("auto", "align32"))
    packing: bool = _f(False, "pack several examples into each fixed-length row (attention "
                        "stays within each example): one compiled shape, no padding")
    pack_length: Optional[int] = _f(None, "tokens per packed row (default: max_length)", low=2)
    prefetch: int = _f(2, "batches prepared ahead in a background thread (0 = off)", low=0)
    curriculum: list = _f([], "stages by epoch: [{until_epoch, max_tokens, max_turns, "
                              "max_difficulty}, ...]")
    quality: QualitySpec = field(default_factory=QualitySpec)
    augmentation: AugmentationSpec = field(default_factory=AugmentationSpec)
    # -- optimization --------------------------------------------------------
    batch_size: int = _f(8, "sequences per optimizer step (the effective batch)", low=1)
    gradient_accumulation_steps: Union[int, str] = _f(
        1, "micro-batches per optimizer step, or 'auto' (from the memory budget)", low=1)
    memory_budget_gb: Optional[float] = _f(None, "memory to plan for with gradient_accumulation_steps"
                                           ": auto (default: 75% of detected memory)", low=0)
    max_steps: Optional[int] = _f(None, "optimizer steps to train (default 2000; or give "
                                  "num_epochs)", low=1)
    num_epochs: Optional[float] = _f(None, "passes over the training data, instead of "
                                     "max_steps (steps = epochs x records // batch_size)",
                                     low=0)
    optimizer: str = _f("adamw", "optimizer", choices=("adamw", "adam", "sgd", "adafactor"))
    learning_rate: float = _f(2e-4, "peak learning rate", low=0)
    weight_decay: float = _f(0.01, "decoupled weight decay (adamw) or L2 (sgd)", low=0)
    betas: list = _f([0.9, 0.999], "Adam betas")
    eps: float = _f(1e-8, "Adam epsilon", low=0)
    momentum: float = _f(0.9, "SGD momentum", low=0, high=1)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)", low=0)
    label_smoothing: float = _f(0.0, "label smoothing epsilon", low=0, high=0.99)
    gradient_noise: GradientNoiseSpec = field(default_factory=GradientNoiseSpec)
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass")
    ema: EmaSpec = field(default_factory=EmaSpec)
    # -- schedule ------------------------------------------------------------
    lr_schedule: str = _f("cosine", "learning-rate schedule after warmup",
                          choices=("cosine", "cosine_restarts", "onecycle", "linear", "constant"))
    warmup_steps: int = _f(50, "linear warmup steps", low=0)
    warmup_ratio: Optional[float] = _f(None, "warmup as a fraction of max_steps (instead of "
                                       "warmup_steps)", low=0, high=1)
    min_lr: Optional[float] = _f(None, "floor of the decay (default: learning_rate / 10)", low=0)
    cosine_restarts: RestartsSpec = field(default_factory=RestartsSpec)
    onecycle: OneCycleSpec = field(default_factory=OneCycleSpec)
    # -- evaluation ----------------------------------------------------------
    eval_steps: int = _f(250, "steps between evaluations", low=1)
    eval_schedule: str = _f("fixed", "fixed: every eval_steps; adaptive: denser early, sparser late",
                            choices=("fixed", "adaptive"))
    val_batches: int = _f(50, "validation batches per evaluation, a fixed subset (-1 = all)", low=-1)
    eval_at_start: bool = _f(True, "evaluate before the first step (the baseline)")
    sample_prompts: list = _f([], "prompts generated at each evaluation (default: first "
                                  "validation prompts)")
    num_samples: int = _f(1, "samples generated at each evaluation (0 = off)", low=0)
    sample_max_tokens: int = _f(64, "tokens generated per sample", low=1)
    eval_metrics: list = _f([], "'module:function' scoring generated text -> float")
    early_stopping: EarlyStoppingSpec = field(default_factory=EarlyStoppingSpec)
    test_at_end: bool = _f(False, "after training, score test.jsonl with the best checkpoint's "
                                  "weights (loss, perplexity, accuracy)", flag="test")
    test_batches: int = _f(-1, "test batches scored by test_at_end (-1 = all)", low=-1)
    # -- checkpoints and output ----------------------------------------------
    output_dir: str = _f("runs/mlx-tune", "run directory (checkpoints, adapters, logs)")
    checkpoint_interval: int = _f(250, "steps between checkpoints", low=1)
    keep_checkpoints: int = _f(3, "recent checkpoints kept (plus best/)", low=1)
    seed: int = _f(0, "seed for every random choice of the run", low=0)
    # -- reporting -----------------------------------------------------------
    report_every: int = _f(10, "steps between progress reports", low=1)
    dashboard: str = _f("auto", "live view: auto (rich on a terminal), rich, plain",
                        choices=("auto", "rich", "plain"))
    tensorboard: bool = _f(True, "write TensorBoard event files")
    allow_sleep: bool = _f(False, "on macOS, let the machine idle-sleep during the run")
    # -- torch backend -------------------------------------------------------
    torch_compile: bool = _f(False, "torch: compile the model with torch.compile")
    torch_threads: Optional[int] = _f(None, "torch: CPU threads (default: half the physical cores; a busy machine runs 1 thread faster than 2)", low=1)


DEFAULT_MAX_STEPS = 2000  # when neither max_steps nor num_epochs is given

# Which top-level fields go under which heading in `mlx-tune train --help`.
SECTIONS = {
    "model": ("model", "backend", "fine_tune_type", "quantize", "quantize_group_size", "dtype",
              "trust_remote_code", "lora"),
    "data": ("data", "max_length", "mask_prompt", "val_split", "streaming", "shuffle_buffer",
             "bucket_widths", "packing", "pack_length", "prefetch", "curriculum", "quality", "augmentation"),
    "optimization": ("batch_size", "gradient_accumulation_steps", "memory_budget_gb", "max_steps",
                     "num_epochs",                     "optimizer", "learning_rate", "weight_decay", "betas", "eps", "momentum",
                     "grad_clip", "label_smoothing", "gradient_noise", "gradient_checkpointing",
                     "ema"),
    "schedule": ("lr_schedule", "warmup_steps", "warmup_ratio", "min_lr", "cosine_restarts",
                 "onecycle"),
    "evaluation and early stopping": ("eval_steps", "eval_schedule", "val_batches",
                                      "eval_at_start", "sample_prompts", "num_samples",
                                      "sample_max_tokens", "eval_metrics", "early_stopping",
                                      "test_at_end", "test_batches"),
    "checkpoints and output": ("output_dir", "checkpoint_interval", "keep_checkpoints", "seed"),
    "reporting": ("report_every", "dashboard", "tensorboard", "allow_sleep"),
    "torch backend": ("torch_compile", "torch_threads"),
}

# Fields a checkpoint cannot survive a change of: resuming across them would load
# tensors of another shape or meaning. Everything else is reported and allowed.
FINGERPRINT_FIELDS = ("model", "backend", "fine_tune_type", "quantize", "quantize_group_size",
                      "lora.rank", "lora.layers", "lora.targets", "optimizer")
# Fields that steer the rest of a run without changing what the saved tensors mean: a
# resume across a change of these is allowed and the change is reported.
RESUME_REPORTED_FIELDS = ("max_steps", "num_epochs", "eval_steps", "eval_schedule", "val_batches",
                          "checkpoint_interval", "keep_checkpoints", "report_every",
                          "learning_rate", "lr_schedule", "gradient_accumulation_steps",
                          "early_stopping.patience")


# -- walking the dataclass tree ------------------------------------------------

def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def leaf_fields(cls: type = Spec, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every settable leaf as (dotted key, field, type), in declaration order."""
    out = []
    hints = _hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if _is_group(tp):
            out.extend(leaf_fields(tp, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, f, tp))
    return out


def get(spec: Any, key: str) -> Any:
    """The value at a dotted key, e.g. ``get(spec, "lora.rank")``."""
    for part in key.split("."):
        spec = getattr(spec, part)
    return spec


def to_dict(spec: Any) -> dict:
    return dataclasses.asdict(spec)


def to_yaml(spec: Spec) -> str:
    return yaml.safe_dump(to_dict(spec), sort_keys=False, default_flow_style=None)


# -- building and validating -----------------------------------------------------

def _where(source: str, lines: dict[str, int], key: str) -> str:
    line = lines.get(key)
    return f"{source}:{line}" if line else source


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _describe(tp: Any, meta: dict) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join("null" if c is None else str(c) for c in meta["choices"])
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list"}
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    text = " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args)
    if tp is Union[int, str]:
        text = "an integer or 'auto'"
    bounds = []
    if meta.get("low") is not None:
        bounds.append(f">= {meta['low']}")
    if meta.get("high") is not None:
        bounds.append(f"<= {meta['high']}")
    return text + (" " + " and ".join(bounds) if bounds else "")


def _coerce(key: str, value: Any, tp: Any, meta: dict, where: str) -> Any:
    """Check one leaf value against its type and range; return it normalised."""
    optional = type(None) in typing.get_args(tp)
    bad = SpecError(f"{where}: '{key}' is {value!r}; expected {_describe(tp, meta)}")
    if value is None:
        if optional or (meta.get("choices") and None in meta["choices"]):
            return None
        raise bad
    base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if tp is Union[int, str]:
        if value == "auto":
            return value
        base = [int]
    kind = base[0]
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise bad
    elif kind is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise bad
        if meta.get("choices"):
            wrong = [v for v in value if v not in meta["choices"]]
            if wrong:
                raise SpecError(f"{where}: '{key}' has {wrong[0]!r}; each entry must be one of "
                                + ", ".join(meta["choices"]))
        return value
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise SpecError(f"{where}: '{key}' is {value!r}; expected {_describe(tp, meta)}"
                        + (_suggest(str(value), [str(c) for c in meta["choices"]])))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = meta.get("low"), meta.get("high")
        if (low is not None and value < low) or (high is not None and value > high):
            raise bad
    return value


def _build(cls: type, raw: Any, prefix: str, source: str, lines: dict[str, int]) -> Any:
    where = _where(source, lines, prefix.rstrip("."))
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: '{prefix.rstrip('.') or 'spec'}' must be a mapping of keys "
                        f"to values, got {type(raw).__name__}")
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = prefix + str(key)
        if key not in names:
            every = [k for k, _, _ in leaf_fields()] + [f.name for f in fields(Spec)]
            raise SpecError(f"{_where(source, lines, full)}: unknown key '{full}'"
                            + _suggest(full, every))
        tp = hints[key]
        f = next(f for f in fields(cls) if f.name == key)
        if _is_group(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, full + ".", source, lines)
        else:
            kwargs[key] = _coerce(full, value, tp, dict(f.metadata), _where(source, lines, full))
    return cls(**kwargs)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _key_lines(text: str) -> dict[str, int]:
    """Map each dotted key of a YAML document to its 1-based line, for error messages."""
    out: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = prefix + str(k.value)
                out[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return out


def load_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Read a YAML spec file: (mapping, key -> line). Errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec ({e.strerror or e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}{line}: invalid YAML ({problem})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a mapping of keys to values")
    return raw, _key_lines(text)


def nest(flat: dict[str, Any]) -> dict:
    """{"lora.rank": 8} -> {"lora": {"rank": 8}}"""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def build_spec(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None,
               log: Any = None) -> Spec:
    """defaults < YAML < command line; validated, with derived defaults filled in.

    An mlx-lm LoRA config is translated first (config/mlx_lm.py); ``log`` gets each
    translation (default: stderr).
    """
    raw, lines, source = {}, {}, "spec"
    if yaml_path is not None:
        raw, lines = load_yaml(yaml_path)
        source = str(yaml_path)
        if mlx_lm.is_mlx_lm(raw):
            try:
                raw, lines = mlx_lm.translate(raw, source, lines, log or _stderr)
            except mlx_lm.ConfigError as e:
                raise SpecError(str(e)) from None
        # Validate the file on its own first so its errors point at its lines.
        _build(Spec, raw, "", source, lines)
    if overrides:
        raw = _merge(raw, nest(overrides))
    # Past the file-only check above, a failure comes from a flag: blame the command line.
    spec = _build(Spec, raw, "", "command line" if overrides else source,
                  {} if overrides else lines)
    return finalize(spec)


def _stderr(message: str) -> None:
    import sys
    print(message, file=sys.stderr)


def finalize(spec: Spec) -> Spec:
    """Cross-field checks and derived defaults (min_lr, curriculum stages)."""
    where = "spec"
    if spec.warmup_ratio is not None and spec.warmup_steps not in (0, Spec.warmup_steps):
        raise SpecError(f"{where}: set either 'warmup_steps' or 'warmup_ratio', not both")
    if spec.max_steps is not None and spec.num_epochs is not None:
        raise SpecError(f"{where}: set either 'max_steps' or 'num_epochs', not both "
                        f"(max_steps={spec.max_steps}, num_epochs={spec.num_epochs})")
    if spec.num_epochs is not None and spec.num_epochs <= 0:
        raise SpecError(f"{where}: 'num_epochs' is {spec.num_epochs}; expected a number > 0")
    max_steps = DEFAULT_MAX_STEPS if spec.max_steps is None and spec.num_epochs is None \
        else spec.max_steps
    if spec.packing and spec.streaming:
        raise SpecError(f"{where}: 'packing' does not support 'streaming' yet; turn one off")
    min_lr = spec.learning_rate / 10 if spec.min_lr is None else spec.min_lr
    if min_lr > spec.learning_rate:
        raise SpecError(f"{where}: 'min_lr' ({min_lr}) must not exceed 'learning_rate' "
                        f"({spec.learning_rate})")
    if len(spec.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1
                                       for b in spec.betas):
        raise SpecError(f"{where}: 'betas' is {spec.betas!r}; expected two numbers in [0, 1)")
    ga = spec.gradient_accumulation_steps
    if isinstance(ga, int) and spec.batch_size % ga:
        raise SpecError(f"{where}: 'batch_size' ({spec.batch_size}) must be divisible by "
                        f"'gradient_accumulation_steps' ({ga})")
    stages = []
    for i, stage in enumerate(spec.curriculum):
        if isinstance(stage, CurriculumStage):
            stages.append(stage)
            continue
        stages.append(_build(CurriculumStage, stage, f"curriculum.{i}.", where, {}))
    ends = [s.until_epoch for s in stages]
    if ends != sorted(set(ends)):
        raise SpecError(f"{where}: 'curriculum' stages must have increasing 'until_epoch', "
                        f"got {ends}")
    if spec.eval_metrics:
        bad = [m for m in spec.eval_metrics if not isinstance(m, str) or ":" not in m]
        if bad:
            raise SpecError(f"{where}: 'eval_metrics' entry {bad[0]!r} must look like "
                            "'package.module:function'")
    return dataclasses.replace(spec, min_lr=min_lr, curriculum=stages, max_steps=max_steps)


def with_epochs(spec: Spec, steps_per_epoch: int) -> Spec:
    """num_epochs -> max_steps, once, from the data's steps per epoch. Everything that
    counts steps (schedules, warmup_ratio, cosine horizon, eval cadence, dashboard, ETA,
    resume) reads max_steps, so both ways of giving the length mean the same run."""
    if spec.num_epochs is None:
        return spec
    return dataclasses.replace(spec, max_steps=max(1, math.ceil(spec.num_epochs * steps_per_epoch)))


def require(spec: Spec, *keys: str) -> None:
    """Fields that a command cannot run without (model, data)."""
    for key in keys:
        if get(spec, key) in (None, ""):
            flag = "--" + key.replace("_", "-").replace(".", "-")
            raise SpecError(f"'{key}' is required: give {flag} or set '{key}:' in the YAML spec")


def fingerprint(spec: Spec) -> dict[str, Any]:
    """What a checkpoint records of its spec: the fields it is bound to
    (FINGERPRINT_FIELDS) and those whose change on resume is only reported. With
    num_epochs, max_steps is derived from the data, so the epochs are what is compared."""
    out = {key: get(spec, key) for key in FINGERPRINT_FIELDS + RESUME_REPORTED_FIELDS}
    if spec.num_epochs is not None:
        out["max_steps"] = None
    return out


def effective_lr_args(spec: Spec) -> dict[str, Any]:
    """Keyword arguments for schedules.build_schedule from a spec."""
    # A short test run (--max-steps 10) with the default warmup of 50 warms up throughout.
    warmup = 0 if spec.warmup_ratio is not None else min(spec.warmup_steps, spec.max_steps)
    return dict(learning_rate=spec.learning_rate, total_steps=spec.max_steps,
                warmup_steps=warmup,
                warmup_ratio=spec.warmup_ratio, min_lr=spec.min_lr,
                t_0=spec.cosine_restarts.t_0, t_mult=spec.cosine_restarts.t_mult,
                max_lr=spec.onecycle.max_lr, pct_start=spec.onecycle.pct_start,
                anneal_strategy=spec.onecycle.anneal_strategy)

