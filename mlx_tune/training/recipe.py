"""The `train` recipe, top to bottom: spec -> backend and model location (setup.py) ->
resume decision -> model and data -> loop -> adapter. Everything that can be checked
without loading a model is checked first."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import yaml

from mlx_tune.checkpoint import faults
from mlx_tune.checkpoint.format import describe_error
from mlx_tune.checkpoint.manager import (CheckpointCorrupt, CheckpointError, CheckpointManager,
                                         Loaded)
from mlx_tune.checkpoint.resume import (RESUME_CAUTION_FIELDS, RESUME_REPORTED_FIELDS,
                                        decide_resume, move_run_aside, spec_fingerprint)
from mlx_tune.checkpoint.rundir import RunLock, check_is_run_dir
from mlx_tune.config.schema import Spec, to_dict
from mlx_tune.config.spec import require, with_epochs
from mlx_tune.data import content_fingerprint
from mlx_tune.distributed.decisions import any_rank, barrier, share_resume_point
from mlx_tune.distributed.peers import guard_run
from mlx_tune.files import atomic_write
from mlx_tune.reporting.factory import make_reporters
from mlx_tune.reporting.records import Reporters
from mlx_tune.supervise import STATUS_ENV
from mlx_tune.system.keepawake import keep_awake, release
from mlx_tune.exit_codes import EXIT_CHECKPOINT_FAILURES, EXIT_OK, EXIT_OVER_MEMORY_BUDGET
from mlx_tune.system.gpu_watchdog import watchdog_status
from mlx_tune.training.first_step import check_first_step
from mlx_tune.training.memory import limits_for
from mlx_tune.training.planner import budget_bytes
from mlx_tune.training.reference import (PinnedReference, attach_of, prepare_reference,
                                         resumed_reference, uses_precomputed, with_reference)
from mlx_tune.training.loop import RunResult, Trainer
from mlx_tune.training.schedules import build_schedule, effective_lr_args
from mlx_tune.training.setup import Setup, setup
from mlx_tune.training.signals import SignalGuard
from mlx_tune.training.state import Progress, check_state, restore
from mlx_tune.training.testset import score_test


def write_spec(spec: Spec, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(output_dir / "spec.yaml", yaml.safe_dump(to_dict(spec), sort_keys=False))


def train(spec: Spec, *, resume: Literal["ask", "auto", "fresh"] = "ask",
          log: Callable[[str], None] = print, accept_changes: bool = False) -> RunResult:
    require(spec, "model", "data")
    output_dir = Path(spec.output_dir)
    # Before anything slow: a directory we may not move aside is refused, and one run
    # holds output_dir for its whole life (the kernel frees the lock on any death).
    if resume == "fresh":
        check_is_run_dir(output_dir)
    data_fp = content_fingerprint(spec)  # also checks the data files' names and kinds
    run = setup(spec, log)
    lock = RunLock(output_dir).acquire() if run.is_main else None
    try:
        return _train(run, output_dir, data_fp, resume, accept_changes)
    finally:
        if lock is not None:
            lock.release()


def _train(run: Setup, output_dir: Path, data_fp: dict, resume: str,
           accept_changes: bool) -> RunResult:
    opened = _open_run(run, output_dir, data_fp, resume, accept_changes)
    trainer, reporters, resume_step = _build_trainer(run, opened, output_dir)
    try:
        return _run_guarded(run, trainer, reporters, resume_step, output_dir)
    finally:
        reporters.close()
        trainer.data.close()


@dataclass
class OpenedRun:
    """Where a run starts: its checkpoint manager (rank 0), its fingerprint, and the
    checkpoint it resumes from (every rank's copy of rank 0's), if any."""
    manager: CheckpointManager | None
    fingerprint: dict
    loaded: Loaded | None
    reference: PinnedReference | None = None  # rank 0, resuming a precomputed reference


def _open_run(run: Setup, output_dir: Path, data_fp: dict, resume: str,
              accept_changes: bool) -> OpenedRun:
    """The resume decision, before the model loads: a refusal costs a second, not a
    minute. --force-fresh moves the old run aside untouched (the lock file stays), before
    the manager tidies anything."""
    spec, backend, log, is_main = run.spec, run.backend, run.log, run.is_main
    if resume == "fresh" and is_main:
        dest = move_run_aside(output_dir)
        if dest is not None:
            log(f"--force-fresh: moved the previous run aside to {dest}")
    manager = CheckpointManager(output_dir / "checkpoints", backend.codec,
                                keep=spec.keep_checkpoints, log=log) if is_main else None
    current = {**spec_fingerprint(spec), **data_fp}
    loaded = None
    if resume != "fresh" and manager is not None:
        loaded = decide_resume(manager, current_fingerprint=current, mode=resume,
                               interactive=sys.stdin.isatty(), log=log,
                               harmless_fields=RESUME_REPORTED_FIELDS, output_dir=output_dir,
                               overridable_fields=RESUME_CAUTION_FIELDS,
                               allow_changes=accept_changes, check=_check_loaded)
    # The reference log-probs a checkpoint pinned, checked before the model loads: a
    # trained model can never recompute them.
    reference = resumed_reference(output_dir, loaded, spec) \
        if loaded is not None and uses_precomputed(spec) else None
    # Distributed runs: every rank restores rank 0's checkpoint. Any run: says so when
    # the checkpoint was written by another number of ranks.
    loaded = share_resume_point(backend, loaded, output_dir, spec, log)
    faults.install(manager)
    return OpenedRun(manager, current, loaded, reference)


def _build_trainer(run: Setup, opened: OpenedRun,
                   output_dir: Path) -> tuple[Trainer, Reporters, int | None]:
    """Model and data, the checkpoint restored, the reporters (whose logs continue from
    the step restored), and the Trainer holding all of them; and the step resumed from."""
    log, is_main = run.log, run.is_main
    run.load()
    faults.install_step(run.backend)
    spec, data = run.spec, run.data
    if is_main:
        write_spec(spec, output_dir)
    pins: dict = {}
    if uses_precomputed(spec):  # before any step, evaluation or first-step check
        reference = prepare_reference(run.backend, spec, data, run.accumulation, output_dir,
                                      opened.reference, opened.loaded is not None, is_main, log)
        run.data = data = with_reference(data, reference.table)
        pins = reference.pin()
    if spec.num_epochs is not None:
        per_epoch = data.train.steps_per_epoch()
        spec = with_epochs(spec, per_epoch)
        log(f"num_epochs={spec.num_epochs:g}: {spec.max_steps} steps ({per_epoch} per epoch: "
            f"{data.train_records} records / batch_size {spec.batch_size})")
    loaded, progress = opened.loaded, None
    if loaded is not None:
        loaded, progress = _restore(spec, run, opened.manager, loaded, output_dir)
        log(f"resumed from {loaded.path} at step {loaded.step}")
    # Logs continue from the resume step; a start from scratch supersedes whatever an
    # earlier attempt that never reached a checkpoint logged (step -1 keeps none of it).
    reporters = make_reporters(spec.dashboard, output_dir=output_dir, total_steps=spec.max_steps,
                               resume_step=loaded.step if loaded else -1,
                               report_to=spec.report_to, config=to_dict(spec),
                               is_main_rank=is_main)
    trainer = Trainer(spec, run.backend, data, reporters, opened.manager,
                      build_schedule(spec.lr_schedule, **effective_lr_args(spec)),
                      run.accumulation, fingerprint=opened.fingerprint, progress=progress,
                      extra_meta=pins)
    return trainer, reporters, loaded.step if loaded else None


def _run_guarded(run: Setup, trainer: Trainer, reporters: Reporters, resume_step: int | None,
                 output_dir: Path) -> RunResult:
    """The loop under the run's guards (a dead or hung peer: one line, exit 8; one signal
    policy from the first step to the last byte, so a SIGTERM/SIGHUP during the final
    checkpoint or the adapter write is noted, not fatal), then the adapter, the test set
    and the summary line."""
    spec, backend, info, is_main = trainer.spec, run.backend, run.info, run.is_main
    keepawake = keep_awake(os.getpid(), spec.allow_sleep,
                           log=run.log if sys.platform == "darwin" else None) if is_main else None
    memory = ExitStack()  # the memory limits hold until the adapter is written
    try:
        budget = budget_bytes(spec, backend=spec.backend)[0]
        applied = memory.enter_context(backend.memory_limits(limits_for(spec.memory, budget)))
        first = check_first_step(backend, spec, trainer.data, run.accumulation,
                                 run.model_path, budget) if spec.memory.first_step_check else None
        reporters.on_start({"model": str(run.model_path), "backend": spec.backend,
                            "trainable_params": info.trainable_params,
                            "total_params": info.total_params, "total_steps": spec.max_steps,
                            "resume_step": resume_step, "output_dir": str(output_dir),
                            "accumulation": run.accumulation, **supervisor_status(),
                            **applied.info(), "first_step": first.info() if first else None})
        for note in applied.notes + ((watchdog_status()[1],) if sys.platform == "darwin" else ()):
            reporters.on_message(note)
        if first is not None:
            reporters.on_message(first.line(), "info" if first.fits else "error")
            # Every rank measured its own step: one over the budget stops them all.
            if backend.all_sum_ints([int(not first.fits)])[0]:
                reason = (f"{first.line()}: stopped before training; try {first.proposal}"
                          if not first.fits else "another rank's first step at the widest "
                          "batch does not fit the memory budget: stopped before training")
                reporters.on_stop(reason, EXIT_OVER_MEMORY_BUDGET)
                return RunResult(EXIT_OVER_MEMORY_BUDGET, reason, trainer.state.step)
        with guard_run(backend) as watchdog, SignalGuard() as signals:
            result = trainer.run(signals, heartbeat=watchdog.beat)
            if is_main:
                result = _write_adapters(backend, spec, output_dir, trainer, result)
            if spec.test_at_end and result.exit_code == 0:
                score = score_test(spec, backend, run.accumulation, result.step, trainer.data,
                                   log=lambda m: reporters.on_message(m),
                                   attach=attach_of(trainer.data))
                if score is not None:
                    reporters.on_message(score.line())
                    reporters.on_test(score)
            if result.first_val_loss and result.last_val_loss is not None:
                reporters.on_message(
                    f"validation loss {result.first_val_loss:.4f} at the first evaluation -> "
                    f"{result.last_val_loss:.4f} at step {result.step} "
                    f"({100 * result.last_val_loss / result.first_val_loss:.0f}%)")
            barrier(backend)  # every rank reports success only once rank 0 has written it
        return result
    finally:
        memory.close()
        release(keepawake)


def supervisor_status() -> dict:
    """Under --supervise, the supervisor's line (restarts, micro-batch) for the start record
    and the dashboard."""
    status = os.environ.get(STATUS_ENV)
    return {"supervisor": status} if status else {}


def _check_loaded(loaded) -> None:
    check_state(loaded.meta)
    if loaded.meta["step"] != loaded.step:
        raise CheckpointCorrupt(f"state.json says step {loaded.meta['step']}, the manifest "
                                f"{loaded.step}")


def _restore(spec: Spec, run: Setup, manager: CheckpointManager | None, loaded: Loaded,
             output_dir: Path) -> tuple[Loaded, Progress]:
    """Restore ``loaded``; a checkpoint whose tensors do not fit the backend (a missing
    optimizer tensor, a wrong shape) is skipped for the previous valid one, like a bad
    checksum. Distributed runs agree: when any rank cannot load it, every rank falls back
    to the checkpoint rank 0 picks next (broadcast as the first one was)."""
    backend, log = run.backend, run.log
    while True:
        try:
            progress = restore(spec, backend, run.data, loaded.arrays, loaded.meta,
                               str(loaded.path))
            error = None
        except Exception as e:  # noqa: BLE001 - any failure to load means "unusable"
            progress, error = None, describe_error(e)
        if not any_rank(error is not None, backend):
            return loaded, progress
        reason = f"{loaded.path}: its state does not load ({error or 'on another rank'})"
        log(f"skipping {reason}")
        step = loaded.step
        del loaded
        below = (manager.latest_valid(log, check=_check_loaded, below=step)
                 if manager is not None else None)
        loaded = share_resume_point(backend, below, output_dir, spec, log)
        if loaded is None:
            # The backend may hold part of the rejected state: do not train on it.
            raise CheckpointError(
                f"no checkpoint in {output_dir / 'checkpoints'} loads into this run "
                f"({reason}); use --force-fresh to move the run aside and start over")


def _write_adapters(backend, spec: Spec, output_dir: Path, trainer: Trainer,
                    result: RunResult) -> RunResult:
    """Write the adapter(s). A failure (disk full, directory gone) is one line naming the
    last good checkpoint, which holds the same weights; the exit code says saving failed."""
    try:
        backend.save_adapter(output_dir / "adapters")
        if spec.ema.enabled:
            with backend.ema_weights():
                backend.save_adapter(output_dir / "adapters_ema")
    except Exception as e:  # noqa: BLE001 - reported in one line, exit code kept meaningful
        last = trainer.state.last_checkpoint
        msg = (f"adapter not written to {output_dir / 'adapters'}: {describe_error(e)}; "
               + (f"the last good checkpoint {last} (step {trainer.state.last_checkpoint_step}) "
                  "holds the weights: free space and rerun with --auto-resume to write it"
                  if last else "no checkpoint holds the weights"))
        trainer.reporters.on_message(msg, "error")
        code = result.exit_code if result.exit_code != EXIT_OK else EXIT_CHECKPOINT_FAILURES
        return replace(result, exit_code=code, reason=msg)
    trainer.reporters.on_message(f"adapter written to {output_dir / 'adapters'}")
    return result
