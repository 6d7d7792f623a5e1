"""The `train` recipe, top to bottom: spec -> backend and model location (setup.py) ->
resume decision -> model and data -> loop -> adapter. Everything that can be checked
without loading a model is checked first."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Literal

import yaml

from mlx_tune.checkpoint import faults
from mlx_tune.checkpoint.manager import CheckpointManager
from mlx_tune.checkpoint.resume import (RESUME_REPORTED_FIELDS, decide_resume, move_run_aside,
                                        spec_fingerprint)
from mlx_tune.config.schema import Spec, to_dict
from mlx_tune.config.spec import with_epochs
from mlx_tune.distributed.decisions import barrier, share_resume_point
from mlx_tune.distributed.peers import guard_run
from mlx_tune.files import atomic_write
from mlx_tune.reporting.factory import make_reporters
from mlx_tune.system.keepawake import keep_awake, release
from mlx_tune.training.loop import RunResult, Trainer
from mlx_tune.training.schedules import build_schedule, effective_lr_args
from mlx_tune.training.setup import setup
from mlx_tune.training.testset import score_test


def write_spec(spec: Spec, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(output_dir / "spec.yaml", yaml.safe_dump(to_dict(spec), sort_keys=False))


def train(spec: Spec, *, resume: Literal["ask", "auto", "fresh"] = "ask",
          log: Callable[[str], None] = print) -> RunResult:
    run = setup(spec, log)
    spec, backend, log, is_main = run.spec, run.backend, run.log, run.is_main
    output_dir = Path(spec.output_dir)

    # Resume decision before the model loads: a refusal costs a second, not a minute.
    # --force-fresh moves the old run aside untouched, before the manager tidies anything.
    if resume == "fresh" and is_main and output_dir.exists() and any(output_dir.iterdir()):
        log(f"--force-fresh: moved the previous run aside to {move_run_aside(output_dir)}")
    manager = CheckpointManager(output_dir / "checkpoints", backend.codec,
                                keep=spec.keep_checkpoints, log=log) if is_main else None
    loaded = None
    if resume != "fresh" and manager is not None:
        loaded = decide_resume(manager, current_fingerprint=spec_fingerprint(spec), mode=resume,
                               interactive=sys.stdin.isatty(), log=log,
                               harmless_fields=RESUME_REPORTED_FIELDS, output_dir=output_dir)
    # Distributed runs: every rank restores rank 0's checkpoint. Any run: says so when
    # the checkpoint was written by another number of ranks.
    loaded = share_resume_point(backend, loaded, output_dir, spec, log)
    faults.install(manager)

    run.load()
    info, data = run.info, run.data
    if is_main:
        write_spec(spec, output_dir)
    if spec.num_epochs is not None:
        per_epoch = data.train.steps_per_epoch()
        spec = with_epochs(spec, per_epoch)
        log(f"num_epochs={spec.num_epochs:g}: {spec.max_steps} steps ({per_epoch} per epoch: "
            f"{data.train_records} records / batch_size {spec.batch_size})")
    # Logs continue from the resume step; a start from scratch supersedes whatever an
    # earlier attempt that never reached a checkpoint logged (step -1 keeps none of it).
    reporters = make_reporters(spec.dashboard, output_dir=output_dir, total_steps=spec.max_steps,
                               resume_step=loaded.step if loaded else -1,
                               tensorboard=spec.tensorboard, is_main_rank=is_main)
    keepawake = keep_awake(os.getpid(), spec.allow_sleep,
                           log=log if sys.platform == "darwin" else None) if is_main else None
    try:
        trainer = Trainer(spec, backend, data, reporters, manager,
                          build_schedule(spec.lr_schedule, **effective_lr_args(spec)),
                          run.accumulation, log=lambda m: reporters.on_message(m))
        if loaded is not None:
            trainer.restore(loaded.arrays, loaded.meta, str(loaded.path))
            log(f"resumed from {loaded.path} at step {loaded.step}")
        reporters.on_start({"model": str(run.model_path), "backend": spec.backend,
                            "trainable_params": info.trainable_params,
                            "total_params": info.total_params, "total_steps": spec.max_steps,
                            "resume_step": loaded.step if loaded else None,
                            "output_dir": str(output_dir)})
        with guard_run(backend) as watchdog:  # a dead or hung peer: one line, exit 8
            trainer.heartbeat = watchdog.beat
            result = trainer.run()
            if is_main:
                backend.save_adapter(output_dir / "adapters")
                if spec.ema.enabled:
                    with backend.ema_weights():
                        backend.save_adapter(output_dir / "adapters_ema")
                reporters.on_message(f"adapter written to {output_dir / 'adapters'}")
            if spec.test_at_end and result.exit_code == 0:
                score = score_test(spec, backend, run.accumulation, result.step, data,
                                   log=lambda m: reporters.on_message(m))
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
        reporters.close()
        data.close()
        release(keepawake)

