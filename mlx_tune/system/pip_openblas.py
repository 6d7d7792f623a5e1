"""The OpenBLAS that pip installs with mlx-tune on Linux (``cmeel-openblas``), made loadable.

``cmeel-openblas`` ships ``cmeel.prefix/lib/libopenblas.so.0``, an ordinary OpenBLAS build
exporting the unprefixed ``cblas_*`` / LAPACK symbols that MLX's CPU backend calls (the
``scipy-openblas32/64`` wheels prefix theirs and cannot stand in). It needs
``libgfortran.so.5``, which a bare machine may not have. The ``mlx[cpu]`` wheel itself (and
numpy's and scipy's) carries a libgfortran, renamed by auditwheel to
``libgfortran-<hash>.so.5.0.0``; the loader looks for the soname ``libgfortran.so.5``. So a
private directory, owned by this user, holds symlinks under the names the loader asks for,
and goes first on the re-exec'd process's ``LD_LIBRARY_PATH``. Nothing on the system changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import stat
import tempfile
from pathlib import Path

DIST = "cmeel-openblas"
LIB = "cmeel.prefix/lib/libopenblas.so.0"
# Wheels that carry a libgfortran (auditwheel's <dist>.libs folders), in order of preference:
# mlx's own CPU wheel first, since the fix only applies where it is installed.
_LIBS_DIRS = ("mlx_cpu.libs", "numpy.libs", "scipy.libs")
PRIVATE_ENV = "MLX_TUNE_BLAS_LIBDIR"  # where the private directory goes (default: user cache)


def wheel_openblas() -> tuple[str, str] | None:
    """(path of the pip-installed libopenblas.so.0, its version), or None."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    lib = Path(str(dist.locate_file(LIB)))
    return (str(lib), dist.version) if lib.is_file() else None


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
