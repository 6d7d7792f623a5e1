"""Weights & Biases via the ``wandb`` package (the optional ``[wandb]`` extra).

Keys: ``train/{loss,loss_avg,learning_rate,grad_norm,tokens_per_second}``, ``val/loss``,
``test/loss``, and ``train/``, ``val/``, ``test/<metric>`` for every metric a report carries
(as TensorBoard's), ``system/{memory,peak_memory,cache_memory,resident_memory}`` (MB), a ``samples`` table per evaluation; the run's spec is
the wandb config, ``run/*`` (model, parameters, output_dir) is added to it at start, and
the stop reason and exit code go to the summary.

One run directory is one wandb run: the run id is kept in ``OUTPUT_DIR/wandb_run_id`` and
a resumed run re-attaches to it (``resume="allow"``), so a night with three restarts is
one run in the UI. wandb's own ``_step`` must only grow -- it drops records logged at an
older step -- while our step goes back to the checkpoint on a resume. So every record
carries the training step as ``global_step`` and all charts are plotted against it
(``define_metric(step_metric=...)``); wandb numbers its history rows itself. The part of
the abandoned attempt past its last checkpoint stays in the history (wandb's history is
append-only offline; metrics.jsonl and TensorBoard drop it).

Project and entity come from WANDB_PROJECT (default ``mlx-tune``) and WANDB_ENTITY;
WANDB_MODE=offline writes the run under ``WANDB_DIR`` (default: the run directory) for a
later ``wandb sync``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from mlx_tune.reporting.records import EvalReport, NullReporter, TrainReport

RUN_ID_FILE = "wandb_run_id"
STEP_KEY = "global_step"


def run_id_for(output_dir: Path) -> str:
    """The wandb run id of this run directory: the stored one, or a new one stored now."""
    path = Path(output_dir) / RUN_ID_FILE
    if path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    run_id = secrets.token_hex(6)  # wandb run ids: lowercase letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)  # a crash mid-write must not leave an empty id behind
    return run_id


class WandbReporter(NullReporter):
    label = "W&B"  # how failure lines name it

    def __init__(self, output_dir: Path | str, config: dict[str, Any] | None = None) -> None:
        import wandb

        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id_for(self.output_dir)
        self._step = 0
        self._exit_code = 0
        self._wandb = wandb
        self.run = wandb.init(
            id=self.run_id,
            resume="allow",
            project=os.environ.get("WANDB_PROJECT", "mlx-tune"),
            name=self.output_dir.resolve().name,
            # WANDB_DIR, when set, wins; otherwise the wandb/ folder sits in the run dir.
            dir=None if os.environ.get("WANDB_DIR") else str(self.output_dir),
            config=config or {},
            # The dashboard redraws many times a second: captured, it would flood
            # output.log. Log lines already go to metrics.jsonl in the run directory.
            settings=wandb.Settings(console="off"),
        )
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY, step_sync=True)

    def _log(self, values: dict[str, Any], step: int) -> None:
        self.run.log({STEP_KEY: step, **values})

    def on_start(self, info: dict) -> None:
        self.run.config.update({f"run/{k}": v for k, v in info.items()}, allow_val_change=True)

    def on_train(self, r: TrainReport) -> None:
        self._step = r.step
        self._log({
            "train/loss": r.loss, "train/loss_avg": r.loss_avg,
            "train/learning_rate": r.learning_rate, "train/grad_norm": r.grad_norm,
            "train/tokens_per_second": r.tokens_per_second,
            "system/memory": r.memory_mb, "system/peak_memory": r.peak_memory_mb,
            "system/cache_memory": r.cache_memory_mb,
            **({} if r.resident_mb is None else {"system/resident_memory": r.resident_mb}),
            **{f"train/{name}": value for name, value in r.metrics.items()},
        }, r.step)

    def on_eval(self, r: EvalReport) -> None:
        self._step = max(self._step, r.step)
        values: dict[str, Any] = {"val/loss": r.val_loss,
                                  **{f"val/{name}": v for name, v in r.metrics.items()}}
        if r.samples:
            names = sorted({k for s in r.samples for k in (s.get("metrics") or {})})
            table = self._wandb.Table(columns=["step", "prompt", "output", *names])
            for s in r.samples:
                metrics = s.get("metrics") or {}
                table.add_data(r.step, str(s.get("prompt", "")), str(s.get("text", "")),
                               *(metrics.get(n) for n in names))
            values["samples"] = table
        self._log(values, r.step)

    def on_test(self, score: Any) -> None:
        from mlx_tune.reporting.tensorboard import test_scalars
        self._log({f"test/{n}": v for n, v in test_scalars(score).items()}, score.step)

    def on_stop(self, reason: str, exit_code: int) -> None:
        self._exit_code = exit_code
        self.run.summary["stop_reason"] = reason
        self.run.summary["exit_code"] = exit_code

    def close(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=self._exit_code)
