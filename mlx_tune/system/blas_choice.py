"""Which OpenBLAS mlx-tune preloads on Linux, and why any other was passed over.

In order: ``MLX_TUNE_OPENBLAS`` (a path; ``pip`` picks the pip one even when the system has
one), then the system library (Debian/Ubuntu, Fedora, Arch locations, then the linker
cache), then the one pip installed with mlx-tune (``pip_openblas``). A candidate is only
chosen once a child process has preloaded it and computed a product with it
(``pip_openblas.check``): a library the linker cache names but cannot open, a bad
``MLX_TUNE_OPENBLAS``, a build for another CPU are each passed over with the cause, so the
notice and ``doctor`` never claim an OpenBLAS the process does not run.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from mlx_tune.system import pip_openblas

OVERRIDE = "MLX_TUNE_OPENBLAS"  # an explicit library path (conda, spack, a custom build), or "pip"


@dataclass(frozen=True)
class OpenBlas:
    """An OpenBLAS to preload: ``path`` goes on LD_PRELOAD, ``lib_dir`` (the pip one's
    private libgfortran links) first on LD_LIBRARY_PATH; ``source`` says where it came from."""
    path: str
    source: str  # "MLX_TUNE_OPENBLAS" | "system" | "pip (ngsolve-openblas X.Y.Z)"
    lib_dir: str | None = None

    def describe(self) -> str:
        return f"{self.source} OpenBLAS ({self.path})"


# ELF e_machine of this interpreter's architecture: a foreign-architecture library (multiarch
# cross packages) would only make the loader print an error and be ignored.
_ELF_MACHINE = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}


def _elf_matches(path: str) -> bool:
    """A 64-bit ELF shared object for this machine (read from the header, without loading it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[4] != 2:
        return False
    want = _ELF_MACHINE.get(platform.machine().lower())
    return want is None or int.from_bytes(head[18:20], "little") == want


def _candidates() -> list[str]:
    machine = platform.machine().lower()
    triplet = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu",
               "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}.get(machine)
    paths = []
    if triplet:  # Debian / Ubuntu: the pthread flavour first, then whatever alternative is set
        paths += [f"/usr/lib/{triplet}/openblas-pthread/libopenblas.so.0",
                  f"/usr/lib/{triplet}/openblas-openmp/libopenblas.so.0",
                  f"/usr/lib/{triplet}/libopenblas.so.0"]
    # Fedora names the flavours libopenblasp (pthreads), libopenblaso (OpenMP), libopenblas
    # (serial); Arch ships /usr/lib/libopenblas.so*.
    for pattern in ("/usr/lib64/libopenblasp.so*", "/usr/lib64/libopenblaso.so*",
                    "/usr/lib64/libopenblas*.so*", "/usr/lib/libopenblas*.so*"):
        paths += sorted(glob.glob(pattern))
    # The 64-bit-integer builds (libopenblas64_) export suffixed symbols MLX does not call.
    return [p for p in paths if "64_" not in os.path.basename(p)]


def system_openblases() -> list[str]:
    """System OpenBLAS candidates for this machine, in order: the known paths, then the
    soname the linker cache names (which may still fail to open: each is checked)."""
    found = [p for p in _candidates() if os.path.isfile(p) and _elf_matches(p)]
    soname = ctypes.util.find_library("openblas")  # e.g. "libopenblas.so.0"
    if soname and not any(os.path.basename(p) == soname for p in found):
        found.append(soname)
    return found


def _override_problem(path: str) -> str | None:
    """Why an MLX_TUNE_OPENBLAS path cannot be preloaded, seen without loading it."""
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "a directory, not a library file"
    if not _elf_matches(path):
        return f"not a shared library for this machine ({platform.machine()})"
    return None


@dataclass(frozen=True)
class BlasChoice:
    """The OpenBLAS to preload (or None) and why each candidate before it was passed over."""
    lib: OpenBlas | None
    passed_over: tuple[str, ...] = ()


def choose_openblas() -> BlasChoice:
    """MLX_TUNE_OPENBLAS, else the system's, else pip's: the first that a child process
    proves loaded and computing (``pip_openblas.check``), naming why any before it failed."""
    passed: list[str] = []
    override = (os.environ.get(OVERRIDE) or "").strip()
    candidates: list[OpenBlas] = []
    if override and override.lower() != "pip":
        problem = _override_problem(override)
        if problem:
            passed.append(f"{OVERRIDE}={override}: {problem}")
        else:
            candidates.append(OpenBlas(override, OVERRIDE))
    if override.lower() != "pip":
        candidates += [OpenBlas(lib, "system") for lib in system_openblases()]
    for lib in candidates:
        problem = pip_openblas.check(lib.path, None)
        if problem is None:
            return BlasChoice(lib, tuple(passed))
        passed.append(f"{lib.describe()}: {problem}")
    lib, problems = pip_installed_openblas()
    return BlasChoice(lib, tuple(passed + problems))


def pip_installed_openblas() -> tuple[OpenBlas | None, list[str]]:
    """The first pip-installed OpenBLAS that works on this CPU, with its private
    libgfortran directory (or none, when the system has a libgfortran of its own), and
    why any wheel was passed over."""
    problems: list[str] = []
    wheels = pip_openblas.wheel_openblases()
    if not wheels:
        return None, problems
    gfortran = pip_openblas.wheel_gfortran()
    lib_dir: Path | None = None
    if gfortran is not None:
        try:
            lib_dir = pip_openblas.make_private_lib_dir(gfortran)
        except pip_openblas.PrivateDirError as e:
            problems.append(f"pip OpenBLAS: {e}")
    for path, dist, version in wheels:
        lib = OpenBlas(path, f"pip ({dist} {version})", str(lib_dir) if lib_dir else None)
        problem = (None if _elf_matches(path) else "not a library for this machine") \
            or pip_openblas.check(path, lib_dir)
        if problem is None:
            return lib, []  # a private-folder problem worked around is no problem
        problems.append(f"{lib.describe()}: {problem}")
    return None, problems


def find_openblas() -> OpenBlas | None:
    """The OpenBLAS to preload (``choose_openblas``), or None."""
    return choose_openblas().lib
