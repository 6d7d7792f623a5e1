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
from pathlib import Path
from typing import Any, Callable, Collection, Literal

from mlx_tune.checkpoint.manager import CheckpointManager, Loaded
from mlx_tune.checkpoint.rundir import check_is_run_dir, move_contents_aside
from mlx_tune.config.schema import Spec, get
from mlx_tune.errors import UserError

FINGERPRINT_KEY = "fingerprint"
ResumeMode = Literal["ask", "auto", "fresh"]
_ABSENT = object()

# Fields a checkpoint cannot survive a change of: resuming across them would load
# tensors of another shape or meaning. Everything else is reported and allowed.
FINGERPRINT_FIELDS = ("model", "backend", "fine_tune_type", "quantize", "quantize_group_size",
                      "lora.rank", "lora.layers", "lora.targets", "optimizer", "ema.enabled")
# Fields that change what the saved state or the saved data position means (alpha rescales
# the saved LoRA weights; batch size, seed, buffer, length cut and packing change which
# records a data position points at; mask_prompt and the EMA decay change the objective and
# the averaged weights). A resume across a change is refused unless --accept-changes is
# given. The train file's content hash (data_content.train, see data.content_fingerprint)
# is one of them.
RESUME_CAUTION_FIELDS = ("lora.alpha", "batch_size", "mask_prompt", "ema.decay", "seed",
                         "max_length", "streaming", "shuffle_buffer", "val_split", "packing",
                         "pack_length", "data_content")
# Fields that steer the rest of a run without changing what the saved tensors mean: a
# resume across a change of these is allowed and the change is reported.
RESUME_REPORTED_FIELDS = ("max_steps", "num_epochs", "eval_steps", "eval_schedule", "val_batches",
                          "checkpoint_interval", "keep_checkpoints", "report_every",
                          "learning_rate", "lr_schedule", "gradient_accumulation_steps",
                          "early_stopping.patience", "lora.dropout", "ema.use_for_eval")


def spec_fingerprint(spec: Spec) -> dict[str, Any]:
    """What a checkpoint records of its spec: the fields it is bound to
    (FINGERPRINT_FIELDS), those that need --accept-changes (RESUME_CAUTION_FIELDS; the data
    content hash is added by the recipe) and those whose change on resume is only reported.
    With num_epochs, max_steps is derived from the data, so the epochs are what is
    compared."""
    out = {key: get(spec, key)
           for key in FINGERPRINT_FIELDS + RESUME_REPORTED_FIELDS + RESUME_CAUTION_FIELDS
           if key != "data_content"}
    if spec.num_epochs is not None:
        out["max_steps"] = None
    return out


class ResumeError(UserError):
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


def move_run_aside(output_dir: str | os.PathLike) -> Path | None:
    """Move the old run's files into ``<output_dir>.old-<UTC timestamp>``; delete nothing.

    Refuses (RunDirError) a directory that does not look like an mlx-tune run. The lock
    file stays, so a run holding ``output_dir`` keeps holding it while it starts over."""
    src = Path(output_dir)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    check_is_run_dir(src)
    return move_contents_aside(src)


def _start_fresh(output_dir: Path, log: Callable[[str], None], why: str = "starting fresh") -> None:
    dest = move_run_aside(output_dir) if output_dir.is_dir() else None
    log(f"{why}: moved the previous run in {output_dir} to {dest}" if dest else why)


def decide_resume(manager: CheckpointManager, *, current_fingerprint: dict,
                  mode: ResumeMode, interactive: bool,
                  ask: Callable[[str], str] = input, log: Callable[[str], None] = print,
                  harmless_fields: Collection[str] = (),
                  output_dir: str | os.PathLike | None = None,
                  overridable_fields: Collection[str] = (), allow_changes: bool = False,
                  check: Callable[[Loaded], None] | None = None) -> Loaded | None:
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

    loaded = manager.latest_valid(log, check=check)
    if loaded is None:
        if manager.discover():
            # Starting from step 0 in place would write over the old run's checkpoints
            # and metrics as it reaches their steps: move them aside first.
            _start_fresh(out, log, f"no usable checkpoint in {manager.root}; starting from "
                                   "step 0")
        return None

    saved = loaded.meta.get(FINGERPRINT_KEY)
    if not isinstance(saved, dict):
        blocking, notes = [f"{FINGERPRINT_KEY}: missing from the checkpoint"], []
    else:
        blocking, notes = compare_fingerprints(saved, current_fingerprint, harmless_fields)
        # Settings that change what the saved state or data position means, but that a
        # resume can survive when the user says so (--accept-changes).
        changed = [m for m in blocking if _is_harmless(m.split(":")[0], overridable_fields)]
        blocking = [m for m in blocking if m not in changed]
        older = [m for m in changed if ": checkpoint <absent>," in m]  # older checkpoint
        changed = [m for m in changed if m not in older]
        notes += older
        if changed and not allow_changes:
            raise ResumeError(
                f"{loaded.path} (step {loaded.step}) was written with other settings that "
                "change what its state or data position means: " + "; ".join(changed)
                + ". Restore them, pass --accept-changes to resume anyway, or --force-fresh "
                  f"to move {out} aside and start over.")
        for m in changed:
            log(f"warning: resuming with a changed setting (--accept-changes): {m}")
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
