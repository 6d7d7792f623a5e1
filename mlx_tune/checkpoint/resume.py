"""Deciding whether a run resumes from its last valid checkpoint.

The loop stores ``spec_fingerprint(spec)`` in every checkpoint's meta under
``FINGERPRINT_KEY``. On start, ``decide_resume`` finds the newest valid
checkpoint and refuses to resume it into a run whose blocking fields (model,
fine-tune type, LoRA shape, quantization...) differ, because the saved arrays
would not fit or would silently mean something else.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Literal

from mlx_tune.checkpoint.manager import CheckpointManager, Loaded
from mlx_tune.config.schema import Spec, get

FINGERPRINT_KEY = "fingerprint"
ResumeMode = Literal["ask", "auto", "fresh"]
_ABSENT = object()

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


def spec_fingerprint(spec: Spec) -> dict[str, Any]:
    """What a checkpoint records of its spec: the fields it is bound to
    (FINGERPRINT_FIELDS) and those whose change on resume is only reported. With
    num_epochs, max_steps is derived from the data, so the epochs are what is compared."""
    out = {key: get(spec, key) for key in FINGERPRINT_FIELDS + RESUME_REPORTED_FIELDS}
    if spec.num_epochs is not None:
        out["max_steps"] = None
    return out


class ResumeError(Exception):
    """The run cannot start as asked; the message says what to do instead."""


def _flatten(obj: object, prefix: str = "") -> dict[str, object]:
    # Nested spec sections become dotted names, so messages say "lora.rank".
    if isinstance(obj, dict) and (obj or not prefix):
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def normalize_fingerprint(spec_fields: dict) -> dict:
    """Flat, JSON-normalized copy of the fields a resumed run must share.

    Normalizing through JSON makes a fresh fingerprint compare equal to one read
    back from ``state.json`` (tuples become lists, paths become strings).
    """
    return json.loads(json.dumps(_flatten(spec_fields), sort_keys=True, default=str))


def _show(value: object) -> str:
    if value is _ABSENT:
        return "<absent>"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _is_harmless(name: str, harmless: Collection[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in harmless)


def compare_fingerprints(saved: dict, current: dict,
                         harmless: Collection[str] = ()) -> tuple[list[str], list[str]]:
    """Return ``(blocking, harmless)`` messages, one per differing field.

    ``harmless`` names fields (or dotted prefixes, e.g. ``"train"``) whose
    change is reported but does not prevent resuming, e.g. ``train.iters``.
    Messages read ``"lora.rank: checkpoint 8, spec 16"``.
    """
    saved_f, current_f = normalize_fingerprint(saved), normalize_fingerprint(current)
    blocking: list[str] = []
    notes: list[str] = []
    for name in sorted(set(saved_f) | set(current_f)):
        old, new = saved_f.get(name, _ABSENT), current_f.get(name, _ABSENT)
        if old == new:
            continue
        msg = f"{name}: checkpoint {_show(old)}, spec {_show(new)}"
        (notes if _is_harmless(name, harmless) else blocking).append(msg)
    return blocking, notes


def move_run_aside(output_dir: str | os.PathLike) -> Path:
    """Rename ``output_dir`` to ``<output_dir>.old-<UTC timestamp>``; deletes nothing."""
    src = Path(output_dir)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = src.with_name(f"{src.name}.old-{stamp}")
    dest, n = base, 1
    while dest.exists():  # two fresh starts within one second
        dest, n = base.with_name(f"{base.name}-{n}"), n + 1
    os.rename(src, dest)
    return dest


def _start_fresh(output_dir: Path, log: Callable[[str], None]) -> None:
    if output_dir.is_dir() and any(output_dir.iterdir()):
        dest = move_run_aside(output_dir)
        log(f"starting fresh: moved the previous run {output_dir} to {dest}")
    else:
        log("starting fresh")


def decide_resume(manager: CheckpointManager, *, current_fingerprint: dict,
                  mode: ResumeMode, interactive: bool,
                  ask: Callable[[str], str] = input, log: Callable[[str], None] = print,
                  harmless_fields: Collection[str] = (),
                  output_dir: str | os.PathLike | None = None) -> Loaded | None:
    """Return the checkpoint to resume from, or None to start fresh.

    - ``"fresh"``: move the old output dir aside (never delete) and start over.
    - ``"auto"``: resume the newest valid checkpoint without asking.
    - ``"ask"``: ask ``Resume from step N? [Y/n]`` on a terminal; without one,
      refuse rather than guess (``--auto-resume`` / ``--force-fresh``).
    A checkpoint whose blocking fingerprint fields differ is never resumed.
    ``output_dir`` defaults to the parent of the manager's checkpoints root.
    """
    if mode not in ("ask", "auto", "fresh"):
        raise ValueError(f"unknown resume mode {mode!r}")
    out = Path(output_dir) if output_dir is not None else manager.root.parent
    if mode == "fresh":
        _start_fresh(out, log)
        return None

    loaded = manager.latest_valid(log)
    if loaded is None:
        if manager.discover():
            log(f"no valid checkpoint in {manager.root}; starting from step 0")
        return None

    saved = loaded.meta.get(FINGERPRINT_KEY)
    if not isinstance(saved, dict):
        blocking, notes = [f"{FINGERPRINT_KEY}: missing from the checkpoint"], []
    else:
        blocking, notes = compare_fingerprints(saved, current_fingerprint, harmless_fields)
    if blocking:
        raise ResumeError(
            f"{loaded.path} (step {loaded.step}) was written with a different setup: "
            + "; ".join(blocking)
            + f". Use --force-fresh to move {out} aside and start over, "
              "or pick another --output-dir.")
    for note in notes:
        log(f"resuming despite a changed setting: {note}")

    if mode == "auto":
        log(f"resuming from step {loaded.step} ({loaded.path})")
        return loaded

    if not interactive:
        raise ResumeError(
            f"found checkpoint {loaded.path} (step {loaded.step}) but cannot ask whether "
            "to resume without a terminal: pass --auto-resume to continue it or "
            "--force-fresh to move the old run aside and start over.")
    for _ in range(3):
        try:
            answer = ask(f"Resume from step {loaded.step}? [Y/n] ").strip().lower()
        except EOFError:
            raise ResumeError("no answer to the resume question: pass --auto-resume "
                              "or --force-fresh") from None
        if answer in ("", "y", "yes"):
            log(f"resuming from step {loaded.step} ({loaded.path})")
            return loaded
        if answer in ("n", "no"):
            del loaded  # drop the arrays before a fresh start allocates its own
            _start_fresh(out, log)
            return None
        log("please answer y or n")
    raise ResumeError("no clear answer to the resume question: pass --auto-resume "
                      "or --force-fresh")
