"""The BLAS choice says the truth: every candidate is proven loaded and computing in a
child process before it is chosen; one that is not (a soname the linker cache names but
cannot open, a bad MLX_TUNE_OPENBLAS, a pip OpenBLAS without its private folder) is passed
over with its cause, the next one is tried, and `doctor` names each. The private folder is
never reached through a link and creates nothing outside itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_tune.commands import doctor
from mlx_tune.system import blas, blas_choice, pip_openblas

LINUX = sys.platform.startswith("linux")
WHEEL = pip_openblas.wheel_openblas() if LINUX else None
GFORTRAN = pip_openblas.wheel_gfortran() if LINUX else None
needs_pip_openblas = pytest.mark.skipif(
    not (WHEEL and GFORTRAN), reason="needs Linux and a pip-installed OpenBLAS wheel")


@pytest.fixture
def private_root(tmp_path, monkeypatch):
    root = tmp_path / "private"
    monkeypatch.setenv(pip_openblas.PRIVATE_ENV, str(root))
    monkeypatch.delenv(blas.OVERRIDE, raising=False)
    return root


@needs_pip_openblas
def test_a_soname_the_linker_cache_names_but_cannot_open_is_passed_over(private_root,
                                                                         monkeypatch):
    monkeypatch.setattr(blas_choice, "_candidates", lambda: [])
    monkeypatch.setattr(blas_choice.ctypes.util, "find_library",
                        lambda name: "libopenblas-gone.so.0")
    choice = blas_choice.choose_openblas()
    assert choice.lib is not None and choice.lib.source.startswith("pip")  # the next one
    (line,) = choice.passed_over
    assert line.startswith("system OpenBLAS (libopenblas-gone.so.0): the loader cannot "
                           "preload it") and "cannot open shared object file" in line


@needs_pip_openblas
@pytest.mark.parametrize("kind", ["missing", "directory", "text", "not a blas"])
def test_a_bad_override_is_named_and_the_next_candidate_used(private_root, tmp_path,
                                                             monkeypatch, kind):
    path = {"missing": tmp_path / "nope.so", "directory": tmp_path,
            "text": tmp_path / "libopenblas.so.0",
            "not a blas": Path(next(p for p in ("/lib/x86_64-linux-gnu/libm.so.6",
                                                 "/lib/aarch64-linux-gnu/libm.so.6",
                                                 "/lib64/libm.so.6") if os.path.exists(p)))
            }[kind]
    if kind == "text":
        path.write_text("not a library")
    monkeypatch.setenv(blas.OVERRIDE, str(path))
    choice = blas_choice.choose_openblas()
    assert choice.lib is not None and choice.lib.source != blas.OVERRIDE
    first = choice.passed_over[0]
    assert first.startswith(f"{blas.OVERRIDE}") and str(path) in first
    cause = {"missing": "no such file", "directory": "a directory, not a library file",
             "text": "not a shared library for this machine",
             "not a blas": "provides no cblas_sgemm"}[kind]
    assert first.split(": ", 1)[1].startswith(cause), first
    # doctor names it, whatever BLAS the process itself runs
    checks = doctor.check_blas()
    assert any(c.status == "WARN" and c.value.startswith(f"not using {blas.OVERRIDE}")
               and cause in c.value for c in checks)


@needs_pip_openblas
def test_an_unusable_private_folder_is_named_not_an_install_hint(private_root, monkeypatch):
    private_root.parent.mkdir(exist_ok=True)
    private_root.write_text("a file where the folder should be")
    monkeypatch.setattr(blas_choice, "system_openblases", lambda: [])
    choice = blas_choice.choose_openblas()
    if choice.lib is not None:  # the system has a libgfortran of its own: no folder needed
        assert choice.lib.lib_dir is None and choice.passed_over == ()
        return
    assert any("no private folder for its libgfortran links" in line
               and pip_openblas.PRIVATE_ENV in line for line in choice.passed_over)
    advice = blas.blas_advice({"kind": "reference", "available": None, "fix_disabled": False,
                               "passed_over": list(choice.passed_over)})
    assert advice.startswith("no installed OpenBLAS can be used") and "pip install" not in advice


@needs_pip_openblas
def test_a_linked_private_root_is_refused_and_nothing_is_created_through_it(tmp_path,
                                                                            monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = tmp_path / "root"
    root.symlink_to(elsewhere)
    monkeypatch.setenv(pip_openblas.PRIVATE_ENV, str(root))
    with pytest.raises(pip_openblas.PrivateDirError, match="is a symbolic link"):
        pip_openblas.make_private_lib_dir(GFORTRAN)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "outside" / "x")
    monkeypatch.setenv(pip_openblas.PRIVATE_ENV, str(dangling))
    with pytest.raises(pip_openblas.PrivateDirError):
        pip_openblas.make_private_lib_dir(GFORTRAN)
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "outside").exists()


@needs_pip_openblas
def test_a_planted_mark_link_is_not_followed(private_root, tmp_path):
    folder = pip_openblas.make_private_lib_dir(GFORTRAN)
    outside = tmp_path / "outside-file"
    assert pip_openblas.check(WHEEL[0], folder) is None  # a real success: a mark is made
    (mark,) = folder.glob("ok-*")
    mark.unlink()
    mark.symlink_to(outside)  # dangling: a follow would create outside-file
    assert pip_openblas.check(WHEEL[0], folder) is None  # not trusted: checked again
    assert not outside.exists() and mark.is_symlink()


@pytest.mark.skipif(not LINUX, reason="the preload check reads /proc/self/maps")
def test_after_the_reexec_a_preload_that_did_not_load_is_said(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.MARKER)}
    env.update({blas.MARKER: "openblas", "LD_PRELOAD": str(tmp_path / "libopenblas.so.0"),
                "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    done = subprocess.run([sys.executable, "-c", "from mlx_tune.system.blas import "
                           "maybe_reexec_with_openblas as m; m([])"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "is not loaded in this process" in done.stderr and "doctor" in done.stderr
