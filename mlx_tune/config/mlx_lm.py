"""mlx-lm LoRA configs (``mlx_lm.lora --config lora_config.yaml``) read as mlx-tune specs.

A file is an mlx-lm config when it has a key only mlx-lm uses (``iters``,
``lora_parameters``, ``steps_per_eval``...). Every key is translated to ours and each
translation is reported once (``iters 600 -> max_steps 600``); a key with no equivalent
is refused by name, never silently dropped. This module imports nothing of ours, so
spec.py can use it without a cycle. The key set is mlx-lm's own
(``mlx_lm/lora.py`` CONFIG_DEFAULTS and its LORA.md).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable

from mlx_tune.config.schema import Spec



class ConfigError(ValueError):
    """A key that cannot be translated; spec.py reports it as a SpecError."""

# Keys that only an mlx-lm config has; any one of them marks the file as one.
MARKERS = ("iters", "lora_parameters", "num_layers", "steps_per_eval", "steps_per_report",
           "save_every", "adapter_path", "max_seq_length", "grad_checkpoint",
           "grad_accumulation_steps", "resume_adapter_file", "test_batches", "hf_dataset",
           "train", "test", "optimizer_config")

RENAMED = {  # mlx-lm key -> ours, value unchanged
    "model": "model", "data": "data", "seed": "seed", "fine_tune_type": "fine_tune_type",
    "batch_size": "batch_size", "learning_rate": "learning_rate", "mask_prompt": "mask_prompt",
    "val_batches": "val_batches", "trust_remote_code": "trust_remote_code",
    "iters": "max_steps", "num_layers": "lora.layers", "steps_per_report": "report_every",
    "steps_per_eval": "eval_steps", "save_every": "checkpoint_interval",
    "max_seq_length": "max_length", "grad_checkpoint": "gradient_checkpointing",
    "grad_accumulation_steps": "gradient_accumulation_steps", "test": "test_at_end",
    "test_batches": "test_batches",
}
# mlx-lm's LoRA keys are module paths; ours are short names.
KEYS = {f"{part}.{name}_proj": short for part, names in
        (("self_attn", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "down")))
        for name in names for short in [name]}
SCHEDULES = {"cosine_decay": "cosine", "linear_schedule": "linear"}
# mlx-lm's defaults (mlx_lm/lora.py CONFIG_DEFAULTS) for keys with an equivalent: a config
# that leaves them out trains as it would under mlx-lm, not with mlx-tune's defaults.
DEFAULTS = {"optimizer": "adam", "seed": 0, "num_layers": 16, "batch_size": 4, "iters": 1000,
            "val_batches": 25, "learning_rate": 1e-5, "steps_per_report": 10,
            "steps_per_eval": 200, "adapter_path": "adapters", "save_every": 100,
            "max_seq_length": 2048, "grad_checkpoint": False, "grad_accumulation_steps": 1,
            "mask_prompt": False, "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
            "fine_tune_type": "lora", "trust_remote_code": False, "test": False}
DROPPED_IF_DEFAULT = {"config": None, "report_to": None, "project_name": None,
                      "resume_adapter_file": None, "clear_cache_threshold": 0}


def is_mlx_lm(raw: dict) -> bool:
    # A key both formats share (test_batches) says nothing about which one this is.
    ours = {f.name for f in fields(Spec)}
    return any(key in raw and key not in ours for key in MARKERS)


def _set(out: dict, key: str, value: Any) -> None:
    node = out
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def translate(raw: dict, source: str, lines: dict[str, int],
              log: Callable[[str], None]) -> tuple[dict, dict[str, int]]:
    """(our raw spec, key -> line) of an mlx-lm config; logs each translation."""
    out: dict = {}
    out_lines: dict[str, int] = {}
    lines = dict(lines)

    def where(key: str) -> str:
        return f"{source}:{lines[key]}" if key in lines else source

    def put(theirs: str, ours: str | None, value: Any, shown: Any = None) -> None:
        if ours is None:  # accepted, with nothing to set
            log(f"mlx-lm config: {theirs} {value} ignored ({shown})")
            return
        _set(out, ours, value)
        if theirs.split(".")[0] in lines or theirs in lines:
            out_lines[ours] = lines.get(theirs, lines.get(theirs.split(".")[0], 0))
        log(f"mlx-lm config: {theirs} {value if shown is None else shown} -> {ours} {value}")

    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"{where(key)}: mlx-lm key '{key}' {why}")

    given = dict(raw)
    for key, value in DEFAULTS.items():  # what mlx-lm would use, not our defaults
        if key not in given:
            given[key] = value
            lines.pop(key, None)
    for key, value in given.items():
        try:
            _translate_key(key, value, raw, put, refuse, log)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, IndexError):
            # A value of a type the translation cannot use (a list where a mapping goes,
            # text where a number goes): the key is named, never a raw Python error.
            raise refuse(key, f"has a value of the wrong type ({value!r}); see mlx-lm's "
                              "LORA.md for its form") from None
    if "lr_schedule" not in raw:  # mlx-lm: a constant learning rate, no warmup
        put("lr_schedule", "lr_schedule", "constant", shown="(none)")
        put("warmup_steps", "warmup_steps", 0, shown="(none)")
    return out, out_lines


def _translate_key(key: str, value: Any, raw: dict, put, refuse, log) -> None:
    if key in RENAMED:
        put(key, RENAMED[key], value)
    elif key in DROPPED_IF_DEFAULT:
        if value != DROPPED_IF_DEFAULT[key]:
            raise refuse(key, "has no mlx-tune equivalent (remove it)")
    elif key == "train":
        if value is not True:
            raise refuse(key, "is false: mlx-tune train always trains (to score a run on "
                              "test data, set test: true)")
        log("mlx-lm config: train true (mlx-tune train always trains)")
    elif key == "adapter_path":
        put(key, "output_dir", value)
        log(f"mlx-lm config: the adapter is written to {value}/adapters, checkpoints and "
            f"logs beside it")
    elif key == "optimizer":
        if value == "muon":
            raise refuse(key, "'muon' has no mlx-tune equivalent (adamw, adam, sgd, "
                              "adafactor)")
        put(key, "optimizer", value)
    elif key == "optimizer_config":
        _optimizer_config(value, raw.get("optimizer", "adam"), put, refuse)
    elif key == "lora_parameters":
        _lora(value, put, refuse)
    elif key == "lr_schedule":
        _schedule(value, put, refuse, raw.get("learning_rate"))
    elif key == "hf_dataset":
        _hf_dataset(value, put, refuse)
    else:
        raise refuse(key, "is not an mlx-lm LoRA config key that mlx-tune knows")


def _number(value: Any) -> float | None:
    """A float from a number or numeric text (YAML 1.1 reads 1e-5 as text), else None."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _lora(value: Any, put, refuse) -> None:
    if not isinstance(value, dict):
        raise refuse("lora_parameters", "must be a mapping of rank, scale, dropout, keys")
    rank = value.get("rank", 8)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise refuse("lora_parameters", f"rank is {rank!r}; expected an integer")
    if "scale" in value and _number(value["scale"]) is None:
        raise refuse("lora_parameters", f"scale is {value['scale']!r}; expected a number")
    for k, v in value.items():
        if k == "rank":
            put("lora_parameters.rank", "lora.rank", v)
        elif k == "dropout":
            put("lora_parameters.dropout", "lora.dropout", v)
        elif k == "scale":
            # mlx-lm scales the update by `scale`; ours by alpha / rank.
            put("lora_parameters.scale", "lora.alpha", _number(v) * rank, shown=v)
        elif k == "keys":
            unknown = [key for key in v if key not in KEYS] if isinstance(v, list) else [v]
            if unknown:
                raise refuse("lora_parameters", f"keys has {unknown[0]!r}; mlx-tune adapts "
                             + ", ".join(KEYS))
            targets = [KEYS[key] for key in v]
            put("lora_parameters.keys", "lora.targets", targets, shown=v)
        else:
            raise refuse("lora_parameters", f"has '{k}'; expected rank, scale, dropout, keys")
    if "scale" not in value:  # mlx-lm's default scale, 20
        put("lora_parameters.scale", "lora.alpha", 20.0 * rank, shown="(default 20)")
    if "dropout" not in value:
        put("lora_parameters.dropout", "lora.dropout", 0.0, shown="(default 0.0)")


def _optimizer_config(value: Any, optimizer: str, put, refuse) -> None:
    if not isinstance(value, dict):
        raise refuse("optimizer_config", "must map optimizer names to their settings")
    for name, settings in value.items():
        if not settings:
            continue
        if name != optimizer:
            continue  # settings of an optimizer the config does not use: mlx-lm ignores them
        for k, v in settings.items():
            if k in ("weight_decay", "betas", "eps", "momentum"):
                put(f"optimizer_config.{name}.{k}", k, v)
            else:
                raise refuse("optimizer_config", f"{name}.{k} has no mlx-tune equivalent")


def _schedule(value: Any, put, refuse, learning_rate: Any) -> None:
    if not isinstance(value, dict) or value.get("name") not in SCHEDULES:
        raise refuse("lr_schedule", "must name cosine_decay or linear_schedule (mlx-tune has "
                                    "no equivalent of others)")
    args = list(value.get("arguments") or [])
    put("lr_schedule.name", "lr_schedule", SCHEDULES[value["name"]], shown=value["name"])
    if args:
        put("lr_schedule.arguments[0]", "learning_rate", args[0])
    end = args[2] if value["name"] == "cosine_decay" and len(args) > 2 else \
        args[1] if value["name"] == "linear_schedule" and len(args) > 1 else 0.0
    put("lr_schedule.end", "min_lr", end)
    put("lr_schedule.warmup", "warmup_steps", int(value.get("warmup", 0)))
    for k in value:
        if k not in ("name", "arguments", "warmup", "warmup_init"):
            raise refuse("lr_schedule", f"has '{k}'; expected name, arguments, warmup, "
                                        "warmup_init")
    if value.get("warmup_init"):
        # Ours warms up linearly from 0; mlx-lm's from warmup_init (1e-7 in its examples).
        put("lr_schedule.warmup_init", None, value["warmup_init"], shown="warmup starts from 0")


FEATURES = {"prompt_feature": "prompt", "completion_feature": "completion",
            "text_feature": "text", "chat_feature": "messages"}


def _split_name(value: Any, key: str, refuse) -> str:
    if not isinstance(value, str) or not value or "[" in value:
        raise refuse("hf_dataset", f"{key} {value!r}: mlx-tune takes a split name (split "
                                   "slices like 'train[:80%]' have no equivalent; give "
                                   "val_split a fraction to hold out part of train)")
    return value


def _hf_dataset(value: Any, put, refuse) -> None:
    """mlx-lm's hf_dataset (LORA.md): path, splits, *_feature column names."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        raise refuse("hf_dataset", "must be one mapping with a 'path' (mlx-tune trains on one "
                                   "dataset; several are not combined)")
    for k, v in value.items():
        if k == "path":
            put("hf_dataset.path", "data", v)
        elif k == "train_split":
            put("hf_dataset.train_split", "data_split", _split_name(v, k, refuse))
        elif k == "valid_split":
            put("hf_dataset.valid_split", "val_split", _split_name(v, k, refuse))
        elif k == "test_split":
            if _split_name(v, k, refuse) != "test":
                raise refuse("hf_dataset", f"test_split {v!r}: mlx-tune scores the split "
                                           "named 'test'")
            log_only = "scored when test: true"
            put("hf_dataset.test_split", None, v, shown=f"(the 'test' split is {log_only})")
        elif k in FEATURES:
            put(f"hf_dataset.{k}", f"data_fields.{FEATURES[k]}", v)
        elif k == "config" and not v:
            continue
        elif k == "mask_prompt":
            put("hf_dataset.mask_prompt", "mask_prompt", v)
        else:
            raise refuse("hf_dataset", f"has '{k}'; mlx-tune translates path, train_split, "
                                       "valid_split, test_split, prompt_feature, "
                                       "completion_feature, text_feature, chat_feature")
    if "train_split" not in value and "valid_split" not in value:
        # mlx-lm's defaults, train[:80%] and train[-10%:], hold out part of train.
        put("hf_dataset.valid_split", "val_split", 0.1, shown="(default train[-10%:])")
