"""The reporters of one run, chosen from the spec: a live view or plain lines,
always metrics.jsonl, and the trackers named in ``report_to`` (TensorBoard, wandb)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal, Sequence

from mlx_tune.reporting.records import Reporters, exception_line
from mlx_tune.reporting.text import JsonlReporter, PlainReporter


def stdout_is_terminal() -> bool:
    """True when a live view makes sense: a real TTY that is not TERM=dumb."""
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def make_reporters(
    mode: Literal["auto", "rich", "plain"],
    *,
    output_dir: Path,
    total_steps: int,
    resume_step: int | None,
    report_to: Sequence[str] = ("tensorboard",),
    config: dict[str, Any] | None = None,
    is_main_rank: bool = True,
) -> Reporters:
    """The reporters for one run.

    auto = rich dashboard when stdout is a terminal, plain lines otherwise (log files,
    nohup, CI). ``output_dir/metrics.jsonl`` always; per tracker in ``report_to``:
    ``output_dir/tensorboard/`` and a wandb run (``config``, the run's spec, as its
    config; the run id kept in the run directory). Non-main ranks of a distributed run write no files and print only errors,
    so N ranks do not produce N interleaved copies of every line.
    """
    if mode not in ("auto", "rich", "plain"):
        raise ValueError(f"report mode must be 'auto', 'rich' or 'plain', got {mode!r}")
    if not is_main_rank:
        return Reporters([PlainReporter(sys.stderr, min_level="error")])

    output_dir = Path(output_dir)
    use_rich = mode == "rich" or (mode == "auto" and stdout_is_terminal())
    out = Reporters()
    if use_rich:
        from mlx_tune.reporting.dashboard import RichDashboard

        out.append(RichDashboard(total_steps))
    else:
        out.append(PlainReporter())
    out.append(JsonlReporter(output_dir / "metrics.jsonl", resume_step))
    unknown = [t for t in report_to if t not in ("tensorboard", "wandb")]
    if unknown:
        raise ValueError(f"report_to: unknown tracker {unknown[0]!r}; expected tensorboard, wandb")
    if "tensorboard" in report_to:
        from mlx_tune.reporting.tensorboard import TensorBoardReporter

        out.append(TensorBoardReporter(output_dir / "tensorboard", resume_step))
    if "wandb" in report_to:
        wandb = start_wandb(output_dir, config, out)
        if wandb is not None:
            out.append(wandb)
    return out


def start_wandb(output_dir: Path, config: dict[str, Any] | None, others: Reporters) -> Any:
    """The W&B reporter, or None after one warning: W&B trouble (an endpoint that does not
    answer, a bad key, a full disk under wandb/) must never cost the night, so the run
    trains on with the other trackers. wandb.init waits ``init_timeout`` (its own default
    90 s, WANDB_INIT_TIMEOUT overrides) for the server, then raises."""
    from mlx_tune.reporting.wandb_reporter import WandbReporter

    try:
        return WandbReporter(output_dir, config)
    except Exception as exc:  # noqa: BLE001 - any wandb failure: warn, train on
        kept = ", ".join(type(r).__name__ for r in others)
        others.on_message(f"W&B could not start ({exception_line(exc)}); training on without it "
                          f"(still reporting to: {kept})", "warning")
        return None
