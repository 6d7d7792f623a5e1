"""Building a Spec: defaults, then a YAML file, then command-line flags (later wins).

Validated *before* any model loads, so a typo costs a second instead of a model
download. Errors are one line and name the file, line and key, and what was allowed.
The schema itself (every field, default and range) is config/schema.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import difflib
import math
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Union

import yaml

from mlx_tune.config.yaml_bounded import YamlTooLarge, compose_bounded, construct

from mlx_tune.config import mlx_lm
from mlx_tune.config.schema import DATA_FIELDS, DEFAULT_MAX_STEPS, CurriculumStage, Spec, SpecError, get, is_group, leaf_fields, type_hints
from mlx_tune.objectives import get_objective
from mlx_tune.objectives.base import PreferenceSettings



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
             list: "a list", dict: "a mapping"}
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    text = " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args)
    if tp is Union[int, str]:
        text = "an integer or 'auto'"
    if float in args and str in args:
        text = "a split name or a number"
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
    if float in base and str in base:  # a fraction, or a name (val_split)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                if not value.strip():
                    raise bad from None
                return value
        base = [float]
    kind = base[0]
    if kind is dict:
        if not isinstance(value, dict):
            raise bad
        return value
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
        odd = [v for v in value if isinstance(v, float) and not math.isfinite(v)]
        if odd:
            raise SpecError(f"{where}: '{key}' has {odd[0]!r}; expected finite numbers")
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
        if not math.isfinite(value):  # NaN passes every bound check; inf is never a setting
            raise SpecError(f"{where}: '{key}' is {value!r}; expected a finite number")
        low, high = meta.get("low"), meta.get("high")
        if (low is not None and value < low) or (high is not None and value > high):
            raise bad
    return value


def _build(cls: type, raw: Any, prefix: str, source: str, lines: dict[str, int]) -> Any:
    where = _where(source, lines, prefix.rstrip("."))
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: '{prefix.rstrip('.') or 'spec'}' must be a mapping of keys "
                        f"to values, got {type(raw).__name__}")
    hints = type_hints(cls)
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
        if is_group(tp):
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


def _key_lines(node: Any) -> dict[str, int]:
    """Map each dotted key of a YAML document to its 1-based line, for error messages."""
    out: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = prefix + str(k.value)
                out[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")  # the document was bounded by compose_bounded: aliases cannot blow up
    return out


def load_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Read a YAML spec file: (mapping, key -> line). Errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec ({e.strerror or e})") from None
    try:
        node = compose_bounded(text)
        raw = construct(node)
    except YamlTooLarge as e:
        raise SpecError(f"{path}: refused: the YAML {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}{line}: invalid YAML ({problem})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a mapping of keys to values")
    return raw, _key_lines(node)


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


PREFERENCE_KEYS = ("beta", "loss_type", "simpo_gamma", "desirable_weight", "undesirable_weight")


def preference_settings(spec: Spec) -> PreferenceSettings:
    """The spec's settings for the objective, under TRL's names (label_smoothing is the
    spec's own key: token smoothing for sft, the label-flip rate for dpo and simpo)."""
    p = spec.preference
    return PreferenceSettings(beta=p.beta, loss_type=p.loss_type,
                              label_smoothing=spec.label_smoothing, simpo_gamma=p.simpo_gamma,
                              desirable_weight=p.desirable_weight,
                              undesirable_weight=p.undesirable_weight)


def reference_mode(spec: Spec) -> str | None:
    """The reference policy a run uses: None for an objective that has none (sft, orpo,
    simpo); 'auto' resolved to 'precomputed' for full fine-tuning and for a start from
    init_adapter (the model as loaded is then the reference, and switching an adapter off
    would give the base model instead), else to 'adapter_off'."""
    if not get_objective(spec.objective).needs_reference:
        return None
    mode = spec.preference.reference
    if mode == "auto":
        return "precomputed" if spec.fine_tune_type == "full" or spec.init_adapter \
            else "adapter_off"
    return mode


def check_objective(spec: Spec, where: str) -> None:
    """What an objective cannot combine with, said before anything loads: settings it
    would ignore (the objective's own check), packing, augmentation, a reference policy
    that cannot be the one asked for."""
    try:
        get_objective(spec.objective).check(preference_settings(spec))
    except ValueError as e:
        key = str(e).split(":")[0]
        raise SpecError(f"{where}: " + ("preference." if key in PREFERENCE_KEYS else "")
                        + str(e)) from None
    if not get_objective(spec.objective).needs_reference and spec.preference.reference != "auto":
        raise SpecError(f"{where}: preference.reference: objective {spec.objective} does not "
                        "use it (it has no reference policy); leave it at auto")
    if spec.objective == "sft":
        return
    if spec.packing:
        raise SpecError(f"{where}: 'packing' is for sft only: a preference objective "
                        f"({spec.objective}) scores each completion as a whole row next to "
                        "its pair, which packing would mix with other examples; turn it off")
    if spec.augmentation.enabled:
        raise SpecError(f"{where}: 'augmentation' rewrites sft prompts only; turn it off for "
                        f"'{spec.objective}'")
    if spec.objective == "kto" and spec.streaming:
        raise SpecError(f"{where}: 'streaming' reads records in a shuffled order, but kto "
                        "pairs each example with the next record's completion in file order "
                        "(its KL rows, fixed before training); turn streaming off")
    mode = reference_mode(spec)
    if mode == "adapter_off" and spec.fine_tune_type == "full":
        raise SpecError(f"{where}: preference.reference: adapter_off needs a LoRA/DoRA "
                        "adapter to switch off, and fine_tune_type full has none; use "
                        "precomputed (or auto)")
    if mode == "adapter_off" and spec.init_adapter:
        raise SpecError(f"{where}: preference.reference: adapter_off would take the base "
                        "model, not init_adapter's, as the reference policy; use precomputed "
                        "(or auto)")
    if mode == "precomputed" and spec.streaming:
        raise SpecError(f"{where}: preference.reference: precomputed scores every training "
                        "row before step 0, which 'streaming' never holds at once; turn "
                        "streaming off" + (" (or use reference adapter_off)"
                                           if spec.fine_tune_type != "full"
                                           and not spec.init_adapter else ""))


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
    check_objective(spec, where)
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
    for ours, theirs in spec.data_fields.items():
        if ours not in DATA_FIELDS:
            raise SpecError(f"{where}: 'data_fields' has {ours!r}; the record fields are "
                            + ", ".join(DATA_FIELDS) + _suggest(str(ours), list(DATA_FIELDS)))
        if not isinstance(theirs, str) or not theirs:
            raise SpecError(f"{where}: 'data_fields.{ours}' is {theirs!r}; expected a dataset "
                            "column name")
    report_to = _trackers(spec, where)
    return dataclasses.replace(spec, min_lr=min_lr, curriculum=stages, max_steps=max_steps,
                               report_to=report_to, tensorboard="tensorboard" in report_to)


def _trackers(spec: Spec, where: str) -> list[str]:
    """``report_to`` with the older ``tensorboard`` switch applied. Afterwards
    ``tensorboard`` equals "tensorboard in report_to", so a written spec.yaml reads back
    to the same trackers."""
    out = list(dict.fromkeys(spec.report_to))  # order kept, duplicates dropped
    if spec.tensorboard is True and "tensorboard" not in out:
        out.insert(0, "tensorboard")
    elif spec.tensorboard is False:
        out = [t for t in out if t != "tensorboard"]
    # Checked here, before any model loads, and without importing wandb (seconds).
    if "wandb" in out and importlib.util.find_spec("wandb") is None:
        raise SpecError(f"{where}: 'report_to' includes wandb, which is not installed; "
                        "install it with: pip install 'mlx-tune[wandb]' (or pip install wandb)")
    return out


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
