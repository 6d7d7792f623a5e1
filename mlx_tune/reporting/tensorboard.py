"""TensorBoard event files via tensorboardX (no TensorFlow, no tensorboard needed to write).

Tags: ``train/{loss,loss_avg,learning_rate,grad_norm,tokens_per_second}``, ``val/loss``,
``train/<metric>``, ``val/<metric>`` and ``test/<metric>`` for every metric a report
carries (sft: perplexity, accuracy, ...; dpo: rewards/accuracies, ...),
``system/{memory,peak_memory,cache_memory,resident_memory}`` (MB; resident where the OS
gives it), text ``samples/<i>``, ``run/info`` and ``run/stop_reason`` (tensorboardX stores text
under ``<tag>/text_summary``).

Resume: the writer is opened with ``purge_step=resume_step + 1``, which writes a
SessionLog START marker; TensorBoard then discards the earlier files' events at or past
that step, so the curve does not show the abandoned segment twice.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from mlx_tune.reporting.records import EvalReport, NullReporter, TrainReport


def _import_summary_writer() -> Any:
    """``from tensorboardX import SummaryWriter`` without dragging torch in.

    tensorboardX.writer does ``try: import torch`` at module level (for tensor type checks
    we never need: we pass Python floats). In an MLX run with torch merely installed that
    costs seconds of startup and hundreds of MB of RSS, so torch is hidden for the
    duration of the import -- unless it is already loaded (torch backend), when it is free.
    """
    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def _sample_markdown(sample: dict) -> str:
    # Fenced blocks keep whitespace and stop generated text from being read as markdown.
    metrics = sample.get("metrics") or {}
    parts = [
        "**prompt**", "", "```", str(sample.get("prompt", "")), "```", "",
        "**output**", "", "```", str(sample.get("text", "")), "```",
    ]
    if metrics:
        parts += ["", " · ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in metrics.items())]
    return "\n".join(parts)


def test_scalars(score: Any) -> dict[str, float]:
    """A test score's numbers by name: its loss, perplexity (sft) and metrics."""
    out = {"loss": score.loss, **({"perplexity": score.perplexity}
                                  if score.perplexity is not None else {})}
    return {**out, **score.metrics}


class TensorBoardReporter(NullReporter):
    def __init__(self, logdir: Path | str, resume_step: int | None = None, *,
                 flush_secs: int = 60) -> None:
        SummaryWriter = _import_summary_writer()
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.purge_step = resume_step + 1 if resume_step is not None else None
        self._step = resume_step or 0
        # tensorboardX names files events.out.tfevents.<unix seconds>.<host> and opens
        # them "wb": a writer started within the same second as the previous one (a quick
        # resume) would truncate its file. A nanosecond suffix keeps names unique and
        # still sorted in creation order, which TensorBoard's purge logic relies on.
        self.writer = SummaryWriter(
            str(self.logdir),
            purge_step=self.purge_step,
            flush_secs=flush_secs,
            filename_suffix=f".{time.time_ns()}",
        )

    def on_start(self, info: dict) -> None:
        rows = ["| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()]
        self.writer.add_text("run/info", "\n".join(rows), self._step)

    def on_train(self, r: TrainReport) -> None:
        self._step = r.step
        add, step, wt = self.writer.add_scalar, r.step, r.wall_time
        add("train/loss", r.loss, step, wt)
        add("train/loss_avg", r.loss_avg, step, wt)
        add("train/learning_rate", r.learning_rate, step, wt)
        add("train/grad_norm", r.grad_norm, step, wt)
        add("train/tokens_per_second", r.tokens_per_second, step, wt)
        for name, value in r.metrics.items():
            add(f"train/{name}", value, step, wt)
        add("system/memory", r.memory_mb, step, wt)
        add("system/peak_memory", r.peak_memory_mb, step, wt)
        add("system/cache_memory", r.cache_memory_mb, step, wt)
        if r.resident_mb is not None:
            add("system/resident_memory", r.resident_mb, step, wt)

    def on_eval(self, r: EvalReport) -> None:
        self._step = max(self._step, r.step)
        add, step = self.writer.add_scalar, r.step
        add("val/loss", r.val_loss, step)
        for name, value in r.metrics.items():
            add(f"val/{name}", value, step)
        for i, sample in enumerate(r.samples):
            self.writer.add_text(f"samples/{i}", _sample_markdown(sample), step)
        self.writer.flush()  # evals are rare and the moment people look at the board

    def on_test(self, score) -> None:
        for name, value in test_scalars(score).items():
            self.writer.add_scalar(f"test/{name}", value, score.step)
        self.writer.flush()

    def on_checkpoint(self, step: int, path: str) -> None:
        # After a crash TensorBoard should show at least everything the checkpoint holds.
        self.writer.flush()

    def on_stop(self, reason: str, exit_code: int) -> None:
        self.writer.add_text("run/stop_reason", f"{reason} (exit code {exit_code})", self._step)

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()
