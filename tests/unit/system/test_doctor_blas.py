"""Tests for mlx_tune.system.blas (the OpenBLAS re-exec) and mlx_tune.commands.doctor.

The re-exec tests run real subprocesses through a tiny probe module (``python -m
blas_probe``), since what is tested is the dynamic loader's view of a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from mlx_tune.system import blas, blas_choice

from mlx_tune.commands import doctor
from mlx_tune.commands.doctor import Check, run_doctor

REPO_ROOT = Path(__file__).resolve().parents[3]
LINUX = sys.platform.startswith("linux")
OPENBLAS = blas.find_openblas() if LINUX else None
needs_openblas = pytest.mark.skipif(not (LINUX and OPENBLAS and blas._mlx_cpu_wheel()),
                                    reason="needs Linux, an OpenBLAS and the mlx CPU wheel")
PIP_BLAS = blas.pip_openblas.wheel_openblas() if LINUX else None
needs_pip_openblas = pytest.mark.skipif(
    not (PIP_BLAS and blas._mlx_cpu_wheel()),
    reason="needs Linux, a pip-installed OpenBLAS wheel and the mlx CPU wheel")

PROBE = '''
import json, os, sys
from mlx_tune.system.blas import maybe_reexec_with_openblas, blas_status
maybe_reexec_with_openblas(sys.argv[1:], module="blas_probe", isolate=False)
import mlx.core as mx
mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))
maps = open("/proc/self/maps").read()
print(json.dumps({"ld_preload": os.environ.get("LD_PRELOAD"), "mapped": "libopenblas" in maps,
                  "marker": os.environ.get("MLX_TUNE_BLAS"), "argv": sys.argv[1:],
                  "kind": blas_status()["kind"], "source": blas_status()["source"],
                  "ld_library_path": os.environ.get("LD_LIBRARY_PATH")}))
'''


def run_probe(tmp_path: Path, *args: str, **env: str) -> tuple[dict, str]:
    (tmp_path / "blas_probe.py").write_text(PROBE)
    base = {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH", blas.MARKER, blas.DISABLE)}
    # MLX_TUNE_OPENBLAS stays: the child must pick the OPENBLAS this module found
    base["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), base.get("PYTHONPATH", "")])
    base.update(env)
    out = subprocess.run([sys.executable, "-m", "blas_probe", *args], cwd=tmp_path, env=base,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


# -- find_openblas -------------------------------------------------------------------

@needs_openblas
def test_find_openblas_returns_a_loadable_library():
    assert OPENBLAS and "openblas" in OPENBLAS.path
    if os.path.isabs(OPENBLAS.path):
        assert blas_choice._elf_matches(OPENBLAS.path)


def test_ilp64_builds_are_skipped(monkeypatch):
    monkeypatch.setattr(blas_choice.glob, "glob", lambda pattern: [
        "/usr/lib64/libopenblas64_.so.0", "/usr/lib64/libopenblasp.so.0"])
    assert "/usr/lib64/libopenblas64_.so.0" not in blas_choice._candidates()


# -- the real re-exec, in subprocesses -------------------------------------------------

@needs_openblas
def test_reexec_preloads_openblas_once(tmp_path):
    result, stderr = run_probe(tmp_path, "train", "--model", "x y")
    assert result["ld_preload"].split(":")[0] == OPENBLAS.path
    assert result["mapped"] and result["kind"] == "openblas"
    assert result["marker"] == "openblas" and result["source"] == OPENBLAS.source
    assert result["argv"] == ["train", "--model", "x y"]  # arguments survive the re-exec
    assert stderr.count("mlx-tune: using ") == 1
    assert OPENBLAS.describe() in stderr and "MLX_TUNE_NO_BLAS_FIX=1" in stderr


@needs_openblas
def test_reexec_keeps_an_existing_preload(tmp_path):
    other = "/lib/x86_64-linux-gnu/libm.so.6" if os.path.exists(
        "/lib/x86_64-linux-gnu/libm.so.6") else ""
    if not other:
        pytest.skip("no libm path to preload")
    result, _ = run_probe(tmp_path, LD_PRELOAD=other)
    assert result["ld_preload"] == f"{OPENBLAS.path}:{other}"


@needs_openblas
def test_disabled_by_env(tmp_path):
    result, stderr = run_probe(tmp_path, MLX_TUNE_NO_BLAS_FIX="1")
    assert result["ld_preload"] is None and not result["mapped"]
    assert result["kind"] == "reference"
    assert "OpenBLAS" not in stderr


@needs_openblas
def test_marker_prevents_a_loop(tmp_path):
    # A process that already carries the marker (as the re-exec'd one does) never execs again,
    # even if LD_PRELOAD got lost on the way.
    result, stderr = run_probe(tmp_path, MLX_TUNE_BLAS="openblas")
    assert result["ld_preload"] is None and "OpenBLAS" not in stderr


# -- the decision logic, in process with execve replaced ------------------------------------

class Exec(Exception):
    pass


@pytest.fixture
def fake_exec(monkeypatch):
    calls: list[tuple] = []

    def execve(path, args, env):
        calls.append((path, args, env))
        raise Exec

    monkeypatch.setattr(blas.os, "execve", execve)
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.setattr(blas, "_mlx_cpu_wheel", lambda: True)
    monkeypatch.setattr(blas, "choose_openblas", lambda: blas_choice.BlasChoice(
        blas.OpenBlas("/opt/libopenblas.so.0", "system")))
    for var in ("LD_PRELOAD", blas.MARKER, blas.DISABLE):
        # set-then-delete so teardown also removes what the code under test writes
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    return calls


def test_exec_command_line(fake_exec, capsys):
    with pytest.raises(Exec):
        blas.maybe_reexec_with_openblas(["train", "--auto-resume"])
    path, args, env = fake_exec[0]
    assert path == sys.executable and args[0] == sys.executable
    # `-c` with a bootstrap that drops the current directory from the import path (not -m)
    assert args[-4] == "-c" and "runpy.run_module('mlx_tune'" in args[-3]
    assert args[-2:] == ["train", "--auto-resume"]
    assert env["LD_PRELOAD"] == "/opt/libopenblas.so.0" and env[blas.MARKER] == "openblas"
    err = capsys.readouterr().err
    assert err.strip() == ("mlx-tune: using system OpenBLAS (/opt/libopenblas.so.0) for MLX's "
                           "CPU matrix products; set MLX_TUNE_NO_BLAS_FIX=1 to disable")


@pytest.mark.parametrize("setup", [
    {"platform": "darwin"}, {"env": {"MLX_TUNE_NO_BLAS_FIX": "1"}},
    {"env": {"MLX_TUNE_BLAS": "openblas"}}, {"env": {"LD_PRELOAD": "/x/libopenblas.so"}},
    {"cpu_wheel": False}])
def test_no_exec_when_it_does_not_apply(fake_exec, monkeypatch, capsys, setup):
    if "platform" in setup:
        monkeypatch.setattr(blas.sys, "platform", setup["platform"])
    for k, v in setup.get("env", {}).items():
        monkeypatch.setenv(k, v)
    if "cpu_wheel" in setup:
        monkeypatch.setattr(blas, "_mlx_cpu_wheel", lambda: setup["cpu_wheel"])
    blas.maybe_reexec_with_openblas([])
    assert fake_exec == [] and capsys.readouterr().err == ""


def test_no_openblas_prints_the_hint_once(fake_exec, monkeypatch, capsys):
    monkeypatch.setattr(blas, "choose_openblas", lambda: blas_choice.BlasChoice(None))
    blas.maybe_reexec_with_openblas([])
    blas.maybe_reexec_with_openblas([])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.strip() == blas.HINT
    assert f"pip install {blas.pip_openblas.DIST}" in err
    assert os.environ[blas.MARKER] == "reference" and fake_exec == []


def test_failed_exec_carries_on(fake_exec, monkeypatch, capsys):
    def refuse(*_):
        raise PermissionError("noexec")

    monkeypatch.setattr(blas.os, "execve", refuse)
    blas.maybe_reexec_with_openblas([])
    assert os.environ[blas.MARKER] == "reexec-failed"
    assert "could not restart" in capsys.readouterr().err


def test_blas_status_in_this_process():
    s = blas.blas_status()
    assert s["kind"] in ("openblas", "accelerate", "mkl", "blis", "reference", "unknown")
    assert set(s) >= {"kind", "library", "source", "mapped", "ld_preload", "marker",
                      "fix_disabled", "available", "mlx_cpu_wheel"}


def test_blas_advice():
    base = {"kind": "reference", "available": None, "fix_disabled": False}
    assert f"pip install {blas.pip_openblas.DIST}" in blas.blas_advice(base)
    system = blas.OpenBlas("/l/libopenblas.so.0", "system")
    assert "MLX_TUNE_NO_BLAS_FIX" in blas.blas_advice(
        {**base, "available": system, "fix_disabled": True})
    assert "LD_PRELOAD=/l/libopenblas.so.0" in blas.blas_advice({**base, "available": system})
    pip = blas.OpenBlas("/site/libopenblas.so.0", "pip (cmeel-openblas 1)", "/cache/blas-x")
    assert "LD_PRELOAD=/site/libopenblas.so.0 LD_LIBRARY_PATH=/cache/blas-x OPENBLAS_NUM" in \
        blas.blas_advice({**base, "available": pip})
    assert blas.blas_advice({**base, "kind": "openblas"}) is None


# -- doctor ------------------------------------------------------------------------------

def recording_console() -> Console:
    return Console(record=True, width=200, force_terminal=False, color_system=None)


def test_doctor_reports_mlx_blas_and_every_dependency():
    import mlx.core as mx

    console = recording_console()
    rc = run_doctor(console)
    text = console.export_text()
    assert "mlx version" in text and mx.__version__ in text
    assert "mlx device" in text and "memory" in text
    assert "cpu blas" in text
    for dist, _ in doctor.REQUIRED + doctor.OPTIONAL:
        assert dist in text, dist
    assert "hf cache" in text and "HF_HUB_OFFLINE" in text
    missing = [d for d, _ in doctor.REQUIRED if doctor._version(d) is None]
    assert rc == (1 if missing else 0)
    for line in text.splitlines()[1:-1]:  # every check line starts with its status
        assert line.split()[0] in ("OK", "INFO", "WARN", "FAIL", "hint:"), line


def test_doctor_reference_blas_warns_with_the_apt_line(monkeypatch):
    monkeypatch.setattr(doctor, "blas_status", lambda: {
        "kind": "reference", "library": "/x/mlx_cpu.libs/libblas.so.3", "mapped": [],
        "ld_preload": None, "marker": None, "fix_disabled": False, "available": None,
        "mlx_cpu_wheel": True, "source": None})
    (check,) = doctor.check_blas()
    assert check.status == "WARN" and f"pip install {blas.pip_openblas.DIST}" in check.hint


def test_doctor_names_where_the_openblas_came_from(monkeypatch):
    monkeypatch.setattr(doctor, "blas_status", lambda: {
        "kind": "openblas", "library": "/site/cmeel.prefix/lib/libopenblas.so.0",
        "source": "pip (cmeel-openblas 0.3.31)", "mapped": [], "ld_preload": None,
        "marker": "openblas", "fix_disabled": False, "available": None, "mlx_cpu_wheel": True})
    (check,) = doctor.check_blas()
    assert check.status == "OK"
    assert check.value == ("openblas from pip (cmeel-openblas 0.3.31) "
                           "(/site/cmeel.prefix/lib/libopenblas.so.0)")


def test_doctor_missing_required_dependency_fails(monkeypatch):
    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda d: None if d == "safetensors" else real(d))
    checks = doctor.check_dependencies(import_torch=False)
    bad = [c for c in checks if c.status == "FAIL"]
    assert [c.name for c in bad] == ["safetensors"] and "pip install safetensors" in bad[0].hint
    console = recording_console()
    assert run_doctor(console, collect=lambda: checks) == 1
    assert "missing: safetensors" in console.export_text()


def test_doctor_offline_is_reported(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checks = {c.name: c for c in doctor.check_hf_cache()}
    assert "HF_HUB_OFFLINE is set" in checks["hf offline"].value


def test_run_doctor_ok_with_only_warnings():
    console = recording_console()
    checks = [Check("OK", "a", "1"), Check("WARN", "b", "2", "do x")]
    assert run_doctor(console, collect=lambda: checks) == 0
    text = console.export_text()
    assert "hint: do x" in text and "1 warning" in text
