"""Never lose a night, round two (fast cases): one run per directory, what may be moved
aside, resumes across changed settings or data, semantically broken checkpoints, bounded
YAML, lr-find's plot, data files that are not files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_tune.checkpoint.manager import CheckpointManager, NumpyCodec
from mlx_tune.checkpoint.resume import FINGERPRINT_KEY, ResumeError, decide_resume
from mlx_tune.checkpoint.resume import normalize_fingerprint as fingerprint
from mlx_tune.checkpoint.rundir import LOCK_NAME, RunDirError, RunDirInUse, RunLock, check_is_run_dir
from mlx_tune.exit_codes import EXIT_DIR_IN_USE
from mlx_tune.commands.lr_find import check_plot_target
from mlx_tune.files import WriteRefused
from mlx_tune.config.schema import SpecError
from mlx_tune.config.spec import build_spec
from mlx_tune.data import DataError, content_fingerprint
from mlx_tune.data.records import find_files
from mlx_tune.training.recipe import _check_loaded

HOLD = textwrap.dedent("""
    import sys, time
    from mlx_tune.checkpoint.rundir import RunLock
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def hold_lock(out: Path, env: dict) -> subprocess.Popen:
    """A real process holding the run lock, as a live `mlx-tune train` would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# ------------------------------------------------------------ one run per directory

def test_a_live_lock_refuses_naming_the_holder_and_a_killed_one_never_blocks(tmp_path,
                                                                              subprocess_env):
    out = tmp_path / "run"
    holder = hold_lock(out, subprocess_env)
    try:
        with pytest.raises(RunDirInUse) as ei:
            RunLock(out).acquire()
        assert f"pid {holder.pid}" in str(ei.value) and "\n" not in str(ei.value)
        assert ei.value.exit_code == EXIT_DIR_IN_USE
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        holder.wait()
    assert (out / LOCK_NAME).exists()  # the stale file is still there...
    with RunLock(out):  # ...and does not block
        pass


@pytest.mark.parametrize("content", [["train.jsonl"], [".git", "README.md"], ["notes.txt"]])
def test_force_fresh_refuses_what_is_not_a_run(tmp_path, content):
    d = tmp_path / "out"
    d.mkdir()
    for name in content:
        (d / name).write_text("x")
    with pytest.raises(RunDirError) as ei:
        check_is_run_dir(d)
    assert "refusing" in str(ei.value) and "\n" not in str(ei.value)


def test_force_fresh_refuses_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "spec.yaml").write_text("x")  # even one that once held a run
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunDirError, match="current directory"):
        check_is_run_dir(Path("."))
    check_is_run_dir(tmp_path / "missing")  # nothing there: nothing to refuse


# -------------------------------------------------------------------- resumes

SPEC = {"model": "m", "lora": {"rank": 8, "alpha": 16.0}, "batch_size": 4}
CAUTION = ("lora.alpha", "batch_size", "data_content")


def saved_run(tmp_path: Path, fp: dict, steps=(1, 2)) -> CheckpointManager:
    m = CheckpointManager(tmp_path / "run" / "checkpoints", NumpyCodec(), log=lambda s: None)
    for step in steps:
        m.save(step, {"w": np.full(2, step, np.float32)}, {FINGERPRINT_KEY: fp, "step": step})
    return m


@pytest.mark.parametrize("change,field", [({"lora": {"rank": 8, "alpha": 32.0}}, "lora.alpha"),
                                          ({"batch_size": 8}, "batch_size")])
def test_changed_meaning_is_refused_unless_accepted(tmp_path, change, field):
    m = saved_run(tmp_path, fingerprint(SPEC))
    current = fingerprint({**SPEC, **change})
    with pytest.raises(ResumeError) as ei:
        decide_resume(m, current_fingerprint=current, mode="auto", interactive=False,
                      overridable_fields=CAUTION)
    assert field in str(ei.value) and "--accept-changes" in str(ei.value)
    logs: list[str] = []
    loaded = decide_resume(m, current_fingerprint=current, mode="auto", interactive=False,
                           overridable_fields=CAUTION, allow_changes=True, log=logs.append)
    assert loaded.step == 2 and any("warning" in ln and field in ln for ln in logs)


def test_same_record_count_other_content_is_caught(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = ['{"text": "a"}\n', '{"text": "b"}\n']
    (data / "train.jsonl").write_text("".join(lines))
    spec = build_spec(overrides={"data": str(data)})
    before = content_fingerprint(spec)
    (data / "train.jsonl").write_text("".join(reversed(lines)))  # same size, same count
    after = content_fingerprint(spec)
    assert before != after
    m = saved_run(tmp_path, fingerprint({**SPEC, **before}))
    with pytest.raises(ResumeError, match="data_content.train"):
        decide_resume(m, current_fingerprint=fingerprint({**SPEC, **after}), mode="auto",
                      interactive=False, overridable_fields=CAUTION)


def test_nothing_valid_moves_the_old_run_aside_before_step_0(tmp_path):
    m = saved_run(tmp_path, fingerprint(SPEC))
    out = m.root.parent
    (out / "metrics.jsonl").write_text('{"step": 2}\n')
    for path, _ in m.discover():  # every checkpoint torn
        (path / "state.json").write_text("{")
    logs: list[str] = []
    assert decide_resume(m, current_fingerprint=fingerprint(SPEC), mode="auto",
                         interactive=False, log=logs.append) is None
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "metrics.jsonl").read_text() == '{"step": 2}\n'
    assert len(list((aside / "checkpoints").glob("step-*"))) == 2
    assert not (out / "metrics.jsonl").exists() and m.discover() == []
    assert any("moved the previous run" in ln for ln in logs)


def _state(step: int) -> dict:
    return {"step": step, "trained_tokens": 10, "first_val_loss": None, "last_val_loss": 1.5,
            "interval": {"loss_sum": 0.0, "tokens": 0.0, "steps": 0, "grad_norm": 0.0},
            "data": {}, "early_stopping": {}, "memory": {}, "fingerprint": {}, "backend": {},
            "rng": {"python": [], "numpy": []}}


@pytest.mark.parametrize("breakage,reason", [
    (lambda s: s.pop("interval"), "'interval' is missing"),
    (lambda s: s.update(trained_tokens="10"), "'trained_tokens' is str, expected int"),
    (lambda s: s["rng"].pop("numpy"), "'rng.numpy' is missing"),
    (lambda s: s.update(step=7), "state.json says step 7"),
])
def test_a_verified_checkpoint_with_a_wrong_state_falls_back(tmp_path, breakage, reason):
    m = CheckpointManager(tmp_path / "checkpoints", NumpyCodec(), log=lambda s: None)
    m.save(1, {"w": np.zeros(2, np.float32)}, _state(1))
    broken = _state(2)
    breakage(broken)
    m.save(2, {"w": np.ones(2, np.float32)}, broken)  # files verify: checksums are right
    logs: list[str] = []
    loaded = m.latest_valid(logs.append, check=_check_loaded)
    assert loaded.step == 1
    assert any("step-0000002" in ln and reason in ln for ln in logs), logs


# ------------------------------------------------------------------ bad input

def test_billion_laughs_is_refused_in_bounded_memory(tmp_path):
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(levels) + "\n")
    tic = time.perf_counter()
    with pytest.raises(SpecError) as ei:
        build_spec(path)
    assert time.perf_counter() - tic < 2
    assert str(ei.value).startswith(f"{path}: refused") and "aliases" in str(ei.value)


def test_a_few_legitimate_aliases_still_load(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("lora: &l {rank: 4}\nmax_steps: 3\nlearning_rate: 1.0e-4\n")
    assert build_spec(path).lora.rank == 4


@pytest.mark.parametrize("make,expect", [
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: os.symlink(p.parent / "gone.jsonl", p), "does not exist"),
])
def test_train_jsonl_that_is_no_file_is_named(tmp_path, make, expect):
    make(tmp_path / "train.jsonl")
    with pytest.raises(DataError, match=expect) as ei:
        find_files(tmp_path)
    assert "train.jsonl" in str(ei.value)


def test_lr_find_plot_replaces_only_its_own_output(tmp_path):
    victim = tmp_path / "train.jsonl"
    victim.write_text('{"text": "keep me"}\n')
    with pytest.raises(SpecError, match=r"\.png"):
        check_plot_target(victim)
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\nsomeone else's picture")
    with pytest.raises(WriteRefused, match="not written by lr-find"):
        check_plot_target(photo)
    assert check_plot_target(photo, force=True) == photo
    pytest.importorskip("matplotlib")
    from mlx_tune.reporting.plots import write_lr_find_png
    ours = write_lr_find_png(tmp_path / "lr.png", [1e-5, 1e-4, 1e-3], [3.0, 2.0, 4.0],
                             [3.0, 2.5, 3.0], 1)
    assert check_plot_target(ours) == ours  # a previous plot may be replaced
    assert victim.read_text() == '{"text": "keep me"}\n'


# ------------------------------------------------------------ one-line messages

def test_model_directory_problems_are_named_before_any_weights_load(tmp_path):
    from mlx_tune.models.hub import ModelError, resolve_model
    from mlx_tune.models.tokenizer import load_tokenizer
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"config.json: expected a JSON object .*, got list"):
        resolve_model(str(d), quantize=None, backend="mlx")
    (d / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(ModelError, match="no tokenizer files"):
        load_tokenizer(d)


def test_broken_adapter_config_is_one_line(tmp_path):
    import argparse
    from mlx_tune.commands.generate import generate_cli
    from mlx_tune.models.hub import ModelError
    (tmp_path / "adapter_config.json").write_text('{"quantize": ')
    args = argparse.Namespace(backend="mlx", adapter=str(tmp_path), model="m", prompt="p",
                              system=None, max_tokens=4, tools=None)
    with pytest.raises(ModelError) as ei:
        generate_cli(args)
    assert "adapter_config.json" in str(ei.value) and "\n" not in str(ei.value)


def test_lr_find_infinite_end_lr_is_refused(tmp_path):
    import argparse
    from mlx_tune.commands.lr_find import lr_find_cli
    args = argparse.Namespace(start_lr=1e-7, end_lr=float("inf"), steps=10, plot=None,
                              force=False, config=None)
    with pytest.raises(SpecError, match="--end-lr"):
        lr_find_cli(build_spec(overrides={"model": "m", "data": str(tmp_path)}), args)


def test_output_dir_that_cannot_be_a_directory_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="output_dir .*file/run: cannot create"):
        RunLock(tmp_path / "file" / "run").acquire()


@pytest.mark.parametrize("override", [
    {"lora.alpha": 64.0}, {"batch_size": 16}, {"mask_prompt": False}, {"ema.decay": 0.99},
    {"seed": 1}, {"max_length": 512}, {"streaming": True}, {"shuffle_buffer": 7},
    {"val_split": 0.1}, {"packing": True}])
def test_every_caution_setting_is_refused_by_name(tmp_path, override):
    from mlx_tune.checkpoint.resume import RESUME_CAUTION_FIELDS, spec_fingerprint
    base = {"model": "m", "data": "d"}
    m = saved_run(tmp_path, fingerprint(spec_fingerprint(build_spec(overrides=base))))
    changed = fingerprint(spec_fingerprint(build_spec(overrides={**base, **override})))
    with pytest.raises(ResumeError) as ei:
        decide_resume(m, current_fingerprint=changed, mode="auto", interactive=False,
                      overridable_fields=RESUME_CAUTION_FIELDS)
    (key,) = override
    assert f"{key}: checkpoint" in str(ei.value) and "--accept-changes" in str(ei.value)


def test_second_signal_exits_at_once_first_only_asks():
    from mlx_tune.exit_codes import EXIT_INTERRUPTED
    from mlx_tune.training.loop import SignalGuard
    with SignalGuard() as guard:
        os.kill(os.getpid(), signal.SIGHUP)
        assert guard.requested == "SIGHUP"  # noted; the run finishes its step and saves
        with pytest.raises(SystemExit) as ei:
            os.kill(os.getpid(), signal.SIGTERM)
        assert ei.value.code == EXIT_INTERRUPTED
    assert signal.getsignal(signal.SIGHUP) is not guard._handle  # handlers restored
