"""The pip-installed OpenBLAS (ngsolve-openblas / cmeel-openblas) path: its private libgfortran
directory and a real re-exec that loads it. Training losses against the system OpenBLAS
are compared in tests/e2e/test_pip_blas.py.

Absence of the system libraries is simulated with ``MLX_TUNE_OPENBLAS=pip`` (the system
search is skipped) and shown with the dynamic loader's own trace (``LD_DEBUG=libs``): the
libgfortran that the pip OpenBLAS needs is found in the private directory, before any
system path is searched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_tune.system import blas, blas_choice, pip_openblas

REPO_ROOT = Path(__file__).resolve().parents[3]
LINUX = sys.platform.startswith("linux")
WHEEL = pip_openblas.wheel_openblas() if LINUX else None
GFORTRAN = pip_openblas.wheel_gfortran() if LINUX else None
needs_pip_openblas = pytest.mark.skipif(
    not (WHEEL and GFORTRAN and blas._mlx_cpu_wheel()),
    reason="needs Linux, a pip-installed OpenBLAS wheel and the mlx CPU wheel")

PROBE = '''
import json, os, sys
from mlx_tune.system.blas import maybe_reexec_with_openblas, blas_status
maybe_reexec_with_openblas(sys.argv[1:], module="pip_blas_probe", isolate=False)
import mlx.core as mx
a = mx.random.normal((256, 256), key=mx.random.key(0))
s = blas_status()
print(json.dumps({"ld_preload": os.environ.get("LD_PRELOAD"), "kind": s["kind"],
                  "source": s["source"], "library": s["library"],
                  "sum": (a @ a).sum().item()}))
'''


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (
        "LD_PRELOAD", "LD_LIBRARY_PATH", blas.MARKER, blas.DISABLE, blas.OVERRIDE)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def probe(tmp_path: Path, **env: str) -> tuple[dict, str]:
    (tmp_path / "pip_blas_probe.py").write_text(PROBE)
    out = subprocess.run([sys.executable, "-m", "pip_blas_probe"], cwd=tmp_path,
                         env=clean_env(**env), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


# -- the private directory ---------------------------------------------------------------

@needs_pip_openblas
def test_private_dir_links_libgfortran_under_its_soname(tmp_path, monkeypatch):
    monkeypatch.setenv(pip_openblas.PRIVATE_ENV, str(tmp_path / "cache"))
    folder = pip_openblas.make_private_lib_dir(GFORTRAN)
    assert folder is not None and folder.parent == tmp_path / "cache"
    assert os.path.realpath(folder / "libgfortran.so.5") == os.path.realpath(GFORTRAN)
    # the renamed libquadmath that libgfortran's RPATH ($ORIGIN) will look for beside it
    for dep in GFORTRAN.parent.glob("libquadmath*.so*"):
        assert (folder / dep.name).resolve() == dep.resolve()
    assert pip_openblas.make_private_lib_dir(GFORTRAN) == folder  # reused, not rebuilt
    assert len(list((tmp_path / "cache").iterdir())) == 1   # no leftover temporary folder


@needs_pip_openblas
def test_a_planted_or_writable_private_dir_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(pip_openblas.PRIVATE_ENV, str(root))
    folder = pip_openblas.make_private_lib_dir(GFORTRAN)
    # someone points the link at another library: never put that on the loader's path
    (folder / "libgfortran.so.5").unlink()
    (folder / "libgfortran.so.5").symlink_to("/proc/self/exe")
    with pytest.raises(pip_openblas.PrivateDirError):
        pip_openblas.make_private_lib_dir(GFORTRAN)
    (folder / "libgfortran.so.5").unlink()
    (folder / "libgfortran.so.5").symlink_to(GFORTRAN)
    assert pip_openblas.make_private_lib_dir(GFORTRAN) == folder
    folder.chmod(0o777)  # writable by others: anyone could add a library
    with pytest.raises(pip_openblas.PrivateDirError):
        pip_openblas.make_private_lib_dir(GFORTRAN)


@needs_pip_openblas
def test_a_library_that_cannot_compute_is_not_used(tmp_path, monkeypatch):
    # A build for another CPU would die with SIGILL; a library without cblas_sgemm fails the
    # same child-process check. The real wheel passes, and the verdict is cached.
    monkeypatch.setenv(pip_openblas.PRIVATE_ENV, str(tmp_path / "cache"))
    folder = pip_openblas.make_private_lib_dir(GFORTRAN)
    libc = next(p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6",
                            "/lib64/libm.so.6") if os.path.exists(p))
    assert pip_openblas.check(libc, folder) is not None
    assert not list(folder.glob("ok-*"))
    assert pip_openblas.check(WHEEL[0], folder) is None
    assert len(list(folder.glob("ok-*"))) == 1
    assert pip_openblas.check(WHEEL[0], folder) is None  # from the cache


def test_pip_override_skips_the_system_search(monkeypatch):
    monkeypatch.setattr(blas_choice, "system_openblases", lambda: ["/usr/lib/libopenblas.so.0"])
    monkeypatch.setattr(pip_openblas, "check", lambda lib, lib_dir: None)  # every one "works"
    pip = blas.OpenBlas("/site/libopenblas.so.0", "pip (cmeel-openblas 1)", "/c/blas-x")
    monkeypatch.setattr(blas_choice, "pip_installed_openblas", lambda: (pip, []))
    monkeypatch.delenv(blas.OVERRIDE, raising=False)
    assert blas.find_openblas().source == "system"   # the order: system first...
    monkeypatch.setenv(blas.OVERRIDE, "pip")
    assert blas.find_openblas() == pip                  # ...unless pip is asked for
    monkeypatch.delenv(blas.OVERRIDE)
    monkeypatch.setattr(blas_choice, "system_openblases", lambda: [])
    assert blas.find_openblas() == pip                  # ...and pip when there is none
    env = blas.preload_env(pip, {"LD_LIBRARY_PATH": "/opt/x"})
    assert env["LD_PRELOAD"] == "/site/libopenblas.so.0"
    assert env["LD_LIBRARY_PATH"] == "/c/blas-x:/opt/x"
    assert env["OPENBLAS_NUM_THREADS"] == str(blas.pip_threads())
    assert blas.preload_env(pip, {"OPENBLAS_NUM_THREADS": "3"})["OPENBLAS_NUM_THREADS"] == "3"
    # the system library keeps its own threading
    assert "OPENBLAS_NUM_THREADS" not in blas.preload_env(blas.OpenBlas("/usr/l.so", "system"), {})


# -- a real process on the pip OpenBLAS --------------------------------------------------

@needs_pip_openblas
def test_reexec_with_pip_openblas_loads_libgfortran_from_the_private_dir(tmp_path):
    cache = tmp_path / "cache"
    result, stderr = probe(tmp_path, MLX_TUNE_OPENBLAS="pip", MLX_TUNE_BLAS_LIBDIR=str(cache),
                           LD_DEBUG="libs")
    assert result["ld_preload"] == WHEEL[0]
    assert result["kind"] == "openblas" and result["library"] == os.path.realpath(WHEEL[0])
    assert result["source"] == f"pip ({WHEEL[1]})"
    assert f"mlx-tune: using pip ({WHEEL[1]}) OpenBLAS ({WHEEL[0]})" in stderr
    (folder,) = cache.iterdir()
    # The loader's trace: libgfortran.so.5 is found in the private directory (after, at
    # most, the wheel's own folder, which its RPATH $ORIGIN names), before any system path
    # is searched, so a missing or different system libgfortran plays no part.
    tries = [line.split("trying file=")[1].strip() for line in stderr.splitlines()
             if "trying file=" in line and "libgfortran.so.5" in line]
    assert tries and tries[-1] == str(folder / "libgfortran.so.5"), tries
    own = os.path.dirname(WHEEL[0])
    assert all(os.path.dirname(os.path.normpath(t)) == own for t in tries[:-1]), tries
    assert f"calling init: {folder / 'libgfortran.so.5'}" in stderr


@needs_pip_openblas
def test_pip_and_reference_blas_compute_the_same_product(tmp_path):
    pip_result, _ = probe(tmp_path, MLX_TUNE_OPENBLAS="pip",
                          MLX_TUNE_BLAS_LIBDIR=str(tmp_path / "cache"))
    ref_result, _ = probe(tmp_path, MLX_TUNE_NO_BLAS_FIX="1")
    assert ref_result["kind"] == "reference" and pip_result["kind"] == "openblas"
    # float32 sums over 256-term dot products: blocking order differs, values agree closely
    assert pip_result["sum"] == pytest.approx(ref_result["sum"], rel=1e-4, abs=1e-2)
