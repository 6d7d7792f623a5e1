"""The run specification's schema: every setting, its default, help text and range.

One frozen tree of dataclasses describes a run. Nested groups (``lora``, ``ema``, ...)
are nested mappings in YAML and dash-joined flags on the command line
(``lora.rank`` <-> ``--lora-rank``). Building a Spec from YAML and flags, and
validating it, is config/spec.py.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

import yaml

from mlx_tune.backends import registry
from mlx_tune.errors import SpecError


def _f(default: Any, help: str, *, low: float | None = None, high: float | None = None,
       choices: tuple | None = None, flag: str | None = None) -> Any:
    """A dataclass field carrying its help text and allowed range."""
    meta = {"help": help, "low": low, "high": high, "choices": choices, "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


TRACKERS = ("tensorboard", "wandb")
# Record fields that data_fields can map to Hugging Face dataset columns.
DATA_FIELDS = ("messages", "conversations", "tools", "prompt", "completion", "text", "quality",
               "difficulty", "chosen", "rejected", "label")
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


OBJECTIVE_NAMES = ("sft", "dpo", "orpo", "simpo", "kto")
REFERENCE_MODES = ("auto", "adapter_off", "precomputed")


@dataclass(frozen=True)
class PreferenceSpec:
    """Preference objectives' settings, with TRL's names (label_smoothing is the spec's own).

    ``reference`` (dpo, kto): ``adapter_off`` is the same model with its LoRA/DoRA adapter
    switched off (no second model in memory); ``precomputed`` scores every row once with
    the model as loaded, before step 0, into the run directory (training/reference.py);
    ``auto`` is adapter_off for an adapter trained from the base model, precomputed for
    full fine-tuning and for a start from ``init_adapter``."""

    beta: float = _f(0.1, "dpo/kto: strength of the pull toward the reference; orpo: weight "
                     "of the odds-ratio term; simpo: reward scale (the SimPO paper tunes "
                     "2-10)", low=0)
    loss_type: Optional[str] = _f(None, "dpo: sigmoid (default), ipo, hinge or robust",
                                  choices=(None, "sigmoid", "ipo", "hinge", "robust"))
    simpo_gamma: float = _f(0.5, "simpo: target reward margin", low=0)
    desirable_weight: float = _f(1.0, "kto: weight of desirable examples", low=0)
    undesirable_weight: float = _f(1.0, "kto: weight of undesirable examples", low=0)
    reference: str = _f("auto", "dpo/kto: the reference policy: adapter_off (the base model "
                        "under the adapter), precomputed (log-probs stored before step 0) "
                        "or auto (precomputed for full fine-tuning and init_adapter)",
                        choices=REFERENCE_MODES)


@dataclass(frozen=True)
class MemorySpec:
    cache_limit_gb: Optional[float] = _f(
        None, "bound on the buffer cache, GB (default: 25% of the memory budget; 0 = no "
        "cache: freed buffers go back at once, as clearing every step would)", low=0)
    limit_fraction: float = _f(0.85, "memory cap as a fraction of the Metal recommended "
                               "working set (macOS) or of CUDA device memory", low=0.05, high=1)
    growth_warmup: int = _f(100, "steps before the resident-memory baseline is taken", low=0)
    growth_warning: float = _f(0.25, "warn when resident memory grew by this fraction of "
                               "its baseline", low=0)
    growth_stop: Optional[float] = _f(1.0, "stop (exit 12) when resident memory grew by this "
                                      "fraction of its baseline (null = never)", low=0)
    growth_min_gb: float = _f(1.0, "growth below this many GB neither warns nor stops", low=0)
    growth_patience: int = _f(3, "reports in a row over growth_stop before stopping", low=1)
    first_step_check: bool = _f(True, "before training, one discarded step on the widest "
                                "batch; exit 11 when its peak exceeds the memory budget")
    chunked_loss: Optional[bool] = _f(
        None, "cross-entropy over chunks of positions: full-vocabulary logits of the whole "
        "micro-batch never exist at once (null = auto: on for MLX with a frozen output head, "
        "where it recomputes nothing; off on torch and for full fine-tuning, where it "
        "recomputes the head)")


@dataclass(frozen=True)
class SuperviseSpec:
    enabled: bool = _f(False, "run training as a child of a small supervisor that restarts it "
                       "with --auto-resume after a crash, and halves the micro-batch after "
                       "an out-of-memory one", flag="supervise")
    max_restarts: int = _f(5, "crashes the supervisor recovers from before it gives up "
                           "(exit 14)", low=0)
    backoff_s: float = _f(10.0, "seconds before a restart; doubled for each crash in a row "
                          "that made no progress (at most 16x)", low=0)
    cooldown_every_h: Optional[float] = _f(None, "pause every this many hours of training: "
                                           "checkpoint, exit, wait cooldown_s, resume "
                                           "(unset or 0: never)", low=0)
    cooldown_s: float = _f(300.0, "length of each cooldown pause in seconds", low=0)


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
    backend: str = _f("auto", "training backend (auto: the first registered one whose "
                      "framework imports: mlx, else torch)", choices=("auto", *registry.names()))
    fine_tune_type: str = _f("lora", "what is trained", choices=("lora", "dora", "full"))
    quantize: Optional[int] = _f(None, "quantize the base on load to this many bits (QLoRA)",
                                 choices=(None, 4, 8))
    quantize_group_size: int = _f(64, "quantization group size", choices=(32, 64, 128))
    dtype: str = _f("auto", "dtype of base weights and activations (auto: as stored)",
                    choices=("auto", "float32", "bfloat16", "float16"))
    trust_remote_code: bool = _f(False, "let the tokenizer/model run code shipped with the model")
    lora: LoraSpec = field(default_factory=LoraSpec)
    init_adapter: Optional[str] = _f(None, "start from this trained adapter directory "
                                     "(mlx-tune's final/ or adapters/ output)")
    # -- objective -----------------------------------------------------------
    objective: str = _f("sft", "what is optimized: sft, or preferences: dpo, orpo, simpo, kto",
                        choices=OBJECTIVE_NAMES)
    preference: PreferenceSpec = field(default_factory=PreferenceSpec)
    # -- data ----------------------------------------------------------------
    data: Optional[str] = _f(None, "directory with train.jsonl (+ valid.jsonl or val.jsonl), "
                             "or a Hugging Face dataset: a Hub id or a dataset directory")
    data_split: str = _f("train", "Hugging Face datasets: the split to train on")
    data_fields: dict = _f({}, "Hugging Face datasets: record field -> dataset column, e.g. "
                               "{messages: conversations}")
    max_length: int = _f(1024, "truncate sequences longer than this many tokens", low=2)
    mask_prompt: bool = _f(True, "train on assistant answers only")
    val_split: Optional[Union[float, str]] = _f(
        None, "carve this fraction of train as validation when there is no validation file; "
        "with a Hugging Face dataset, or the name of its validation split", low=0, high=0.5)
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
                                     low=0, high=1e6)
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
    memory: MemorySpec = field(default_factory=MemorySpec)
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
    report_to: list = _f(["tensorboard"], "trackers the metrics go to, among tensorboard, wandb "
                                          "(wandb: pip install 'mlx-tune[wandb]')", choices=TRACKERS)
    tensorboard: Optional[bool] = _f(None, "shorthand for report_to: true adds tensorboard, "
                                           "false removes it (unset: report_to decides)")
    allow_sleep: bool = _f(False, "on macOS, let the machine idle-sleep during the run")
    supervise: SuperviseSpec = field(default_factory=SuperviseSpec)
    # -- torch backend -------------------------------------------------------
    torch_compile: bool = _f(False, "torch: compile the model with torch.compile")
    torch_threads: Optional[int] = _f(None, "torch: CPU threads (default: half the physical cores; a busy machine runs 1 thread faster than 2)", low=1)


DEFAULT_MAX_STEPS = 2000  # when neither max_steps nor num_epochs is given


# -- walking the dataclass tree ------------------------------------------------

def is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def leaf_fields(cls: type = Spec, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every settable leaf as (dotted key, field, type), in declaration order."""
    out = []
    hints = type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if is_group(tp):
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
