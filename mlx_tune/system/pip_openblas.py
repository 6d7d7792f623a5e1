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
(``check()``): a build for another CPU dies there (SIGILL), not in the user's run. The
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
        return _own_dir_problem(folder) is None and all(
            os.readlink(folder / name) == target for name, target in links.items())
    except OSError:
        return False


def _own_dir_problem(folder: Path) -> str | None:
    """None for a real directory (not a link) of this user's that nobody else can write."""
    st = folder.lstat()
    if stat.S_ISLNK(st.st_mode):
        return f"{folder} is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a directory"
    if st.st_uid != os.getuid():
        return f"{folder} belongs to another user"
    if st.st_mode & 0o022:
        return f"{folder} is writable by others"
    return None


def _roots() -> list[Path]:
    explicit = os.environ.get(PRIVATE_ENV)
    if explicit:
        return [Path(explicit)]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(cache) / "mlx-tune", Path(tempfile.gettempdir()) / f"mlx-tune-{os.getuid()}"]


class PrivateDirError(OSError):
    """No private folder for the loader-name links could be had; the message says why."""


def make_private_lib_dir(gfortran: Path) -> Path:
    """The private directory of loader-name links for ``gfortran`` (created once,
    atomically). Each root is used only when it is a real directory of this user's that
    nobody else can write: never through a link, so nothing is created outside it."""
    links = _links(gfortran)
    key = hashlib.sha256("\0".join(f"{k}={v}" for k, v in sorted(links.items()))
                         .encode()).hexdigest()[:16]
    problems = []
    for root in _roots():
        folder = root / f"blas-{key}"
        try:
            if not os.path.lexists(root):
                root.mkdir(parents=True, mode=0o700)
            problem = _own_dir_problem(root)
            if problem:
                problems.append(problem)
                continue
            if _is_ours(folder, links):
                return folder
            tmp = Path(tempfile.mkdtemp(prefix=".blas-", dir=root))  # mode 0700
            for name, target in links.items():
                os.symlink(target, tmp / name)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, folder)  # atomic; fails if a concurrent run got there first
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            problems.append(f"{root}: {e.strerror or e}")
            continue
        if _is_ours(folder, links):
            return folder
        problems.append(f"{folder} holds something else")
    raise PrivateDirError("no private folder for its libgfortran links could be made ("
                          + "; ".join(problems) + f"); set {PRIVATE_ENV} to a writable folder")


# Run in a child with the library preloaded: the preload must be what provides cblas_sgemm
# (the loader only warns, and carries on without it, when a preload cannot be opened) and
# must compute a right product. Prints the path of the library that provides it.
_PROBE = ("import ctypes, sys\n"
          "n = 64\n"
          "a = (ctypes.c_float * (n * n))(*([1.0] * (n * n)))\n"
          "c = (ctypes.c_float * (n * n))()\n"
          "try:\n"
          "    f = ctypes.CDLL(None).cblas_sgemm\n"
          "except AttributeError:\n"
          "    sys.exit('provides no cblas_sgemm')\n"
          "f(101, 111, 111, n, n, n, ctypes.c_float(1.0), a, n, a, n, ctypes.c_float(0.0), c, n)\n"
          "if not (c[0] == n and c[n * n - 1] == n):\n"
          "    sys.exit('computed a wrong product')\n"
          "addr = ctypes.cast(f, ctypes.c_void_p).value\n"
          "for line in open('/proc/self/maps'):\n"
          "    parts = line.split(maxsplit=5)\n"
          "    lo, hi = (int(x, 16) for x in parts[0].split('-'))\n"
          "    if lo <= addr < hi and len(parts) == 6:\n"
          "        print(parts[5].strip())\n")


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
        model = next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
    except OSError:
        flags = model = ""
    return model + flags


def _loader_complaint(stderr: str) -> str | None:
    """The dynamic loader's reason for ignoring a preload, e.g. "cannot open shared object
    file", from its "object 'X' from LD_PRELOAD cannot be preloaded (...): ignored." line."""
    for line in stderr.splitlines():
        if "LD_PRELOAD cannot be preloaded" in line:
            inner = line.split("cannot be preloaded", 1)[1]
            return inner.strip(" :.").removesuffix("ignored").strip(" :.()") or "ignored"
    return None


def check(lib: str, lib_dir: Path | None) -> str | None:
    """None when ``lib``, preloaded (``lib_dir`` first on the library path), is loaded and
    computes a product in a child process on this CPU; else why not, in a few words. A
    success is cached per library file and CPU in ``lib_dir``."""
    mark = None
    try:
        st = os.stat(lib) if os.sep in lib else None
    except OSError as e:
        return e.strerror or "cannot be read"
    if st is not None and lib_dir is not None:
        key = hashlib.sha256(f"{lib}|{st.st_size}|{st.st_mtime_ns}|{_cpu_key()}".encode())
        mark = lib_dir / f"ok-{key.hexdigest()[:16]}"
        try:
            if stat.S_ISREG(mark.lstat().st_mode):
                return None
        except OSError:
            pass
    env = dict(os.environ, LD_PRELOAD=lib, OPENBLAS_NUM_THREADS="1")
    if lib_dir is not None:
        env["LD_LIBRARY_PATH"] = str(lib_dir)
    try:
        done = subprocess.run([sys.executable, "-S", "-c", _PROBE], env=env, timeout=60,
                              capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not be tried ({e})"
    complaint = _loader_complaint(done.stderr)
    if complaint:
        return f"the loader cannot preload it ({complaint})"
    if done.returncode < 0:
        return f"crashed with signal {-done.returncode} (built for another CPU?)"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return last
    if mark is not None:
        try:  # never through a link: the mark is created, not opened
            os.close(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
        except OSError:
            pass  # not cached: the check runs again next time
    return None
