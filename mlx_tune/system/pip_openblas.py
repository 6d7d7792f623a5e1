"""The OpenBLAS that pip installs with mlx-tune on Linux, made loadable and checked.

Two wheels ship an ordinary OpenBLAS build exporting the unprefixed ``cblas_*`` / LAPACK
symbols that MLX's CPU backend calls (the ``scipy-openblas32/64`` wheels prefix theirs and
cannot stand in):

- ``ngsolve-openblas`` (x86_64): a ``DYNAMIC_ARCH`` build, which picks its kernels for the
  CPU at run time, so it runs on any x86-64;
- ``cmeel-openblas`` (x86_64 and aarch64): built for one CPU (``SKYLAKEX`` on x86_64,
  ``NEOVERSEN2`` on aarch64), which may use instructions an older CPU lacks. It is the
  dependency on aarch64, where ngsolve-openblas has no wheel.

Both need ``libgfortran.so.5``, which a bare machine may not have. The ``mlx[cpu]`` wheel
itself (and numpy's and scipy's) carries a libgfortran, renamed by auditwheel to
``libgfortran-<hash>.so.5.0.0``; the loader looks for the soname ``libgfortran.so.5``. So a
private directory, owned by this user, holds symlinks under the names the loader asks for,
and goes first on the re-exec'd process's ``LD_LIBRARY_PATH``. Nothing on the system changes.

Before a wheel's library is used, a child process preloads it and runs a small product
(``works()``): a build for another CPU dies there (SIGILL), not in the user's run. The
verdict is cached in the private directory, keyed by the library and the CPU.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

# (distribution, library path pattern inside site-packages), in order of preference.
WHEELS = (("ngsolve-openblas", "ngsolve_openblas/libopenblas*.so*"),
          ("cmeel-openblas", "cmeel.prefix/lib/libopenblas.so.0"))
# What the install hint names: this machine's dependency (see pyproject.toml).
DIST = "ngsolve-openblas" if platform.machine().lower() in ("x86_64", "amd64") else "cmeel-openblas"
# Wheels that carry a libgfortran (auditwheel's <dist>.libs folders), in order of preference:
# mlx's own CPU wheel first, since the fix only applies where it is installed.
_LIBS_DIRS = ("mlx_cpu.libs", "numpy.libs", "scipy.libs")
PRIVATE_ENV = "MLX_TUNE_BLAS_LIBDIR"  # where the private directory goes (default: user cache)


def wheel_openblases() -> list[tuple[str, str, str]]:
    """(library path, distribution, version) of each pip-installed OpenBLAS wheel."""
    out = []
    for dist_name, pattern in WHEELS:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found = sorted(glob.glob(str(dist.locate_file(pattern))))
        if found:
            out.append((found[0], dist_name, dist.version))
    return out


def wheel_openblas() -> tuple[str, str] | None:
    """(path, "dist version") of the first pip-installed OpenBLAS, or None."""
    found = wheel_openblases()
    return (found[0][0], f"{found[0][1]} {found[0][2]}") if found else None


def _site_dirs() -> list[Path]:
    """site-packages folders holding mlx / numpy / scipy (usually one)."""
    out: list[Path] = []
    for name in ("mlx", "numpy", "scipy"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            if Path(loc).parent not in out:
                out.append(Path(loc).parent)
    return out


def wheel_gfortran() -> Path | None:
    """A libgfortran.so.5 that some installed wheel ships (under its auditwheel name)."""
    for site in _site_dirs():
        for libs in _LIBS_DIRS:
            found = sorted((site / libs).glob("libgfortran*.so.5*"))
            if found:
                return found[0]
    return None


def _links(gfortran: Path) -> dict[str, str]:
    """Link name -> target. libgfortran's own RPATH is $ORIGIN, and $ORIGIN is where the
    link lies, so its renamed libquadmath (next to it in the .libs folder) is linked too."""
    links = {"libgfortran.so.5": str(gfortran)}
    for dep in sorted(gfortran.parent.glob("libquadmath*.so*")):
        links[dep.name] = str(dep)
        links.setdefault("libquadmath.so.0", str(dep))
    return links


def _is_ours(folder: Path, links: dict[str, str]) -> bool:
    """Owned by this user, writable by nobody else, and holding exactly the expected links:
    anything else on the loader's path could inject code into the training process."""
    try:
        st = folder.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return False
        return all(os.readlink(folder / name) == target for name, target in links.items())
    except OSError:
        return False


def _roots() -> list[Path]:
    explicit = os.environ.get(PRIVATE_ENV)
    if explicit:
        return [Path(explicit)]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(cache) / "mlx-tune", Path(tempfile.gettempdir()) / f"mlx-tune-{os.getuid()}"]


def private_lib_dir(gfortran: Path) -> Path | None:
    """The private directory of loader-name links for ``gfortran`` (created once, atomically),
    or None when no usable place can be had."""
    links = _links(gfortran)
    key = hashlib.sha256("\0".join(f"{k}={v}" for k, v in sorted(links.items()))
                         .encode()).hexdigest()[:16]
    for root in _roots():
        folder = root / f"blas-{key}"
        if _is_ours(folder, links):
            return folder
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = Path(tempfile.mkdtemp(prefix=".blas-", dir=root))  # mode 0700
            for name, target in links.items():
                os.symlink(target, tmp / name)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, folder)  # atomic; fails if a concurrent run got there first
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue
        if _is_ours(folder, links):
            return folder
    return None


_PROBE = ("import ctypes\n"
          "n = 64\n"
          "a = (ctypes.c_float * (n * n))(*([1.0] * (n * n)))\n"
          "c = (ctypes.c_float * (n * n))()\n"
          "ctypes.CDLL(None).cblas_sgemm(101, 111, 111, n, n, n, ctypes.c_float(1.0), a, n, "
          "a, n, ctypes.c_float(0.0), c, n)\n"
          "assert c[0] == n and c[n * n - 1] == n, c[0]\n")


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
        model = next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
    except OSError:
        flags = model = ""
    return model + flags


def works(lib: str, lib_dir: Path) -> bool:
    """Whether ``lib``, preloaded with ``lib_dir`` on the library path, computes a product
    in a child process on this CPU (cached per library file and CPU in ``lib_dir``)."""
    try:
        st = os.stat(lib)
    except OSError:
        return False
    key = hashlib.sha256(f"{lib}|{st.st_size}|{st.st_mtime_ns}|{_cpu_key()}".encode())
    mark = lib_dir / f"ok-{key.hexdigest()[:16]}"
    if mark.exists():
        return True
    env = dict(os.environ, LD_PRELOAD=lib, LD_LIBRARY_PATH=str(lib_dir),
               OPENBLAS_NUM_THREADS="1")
    try:
        ok = subprocess.run([sys.executable, "-S", "-c", _PROBE], env=env, timeout=60,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    if ok:
        try:
            mark.touch()
        except OSError:
            pass  # not cached: the check runs again next time
    return ok
