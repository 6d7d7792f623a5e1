"""Give MLX's Linux CPU backend a fast BLAS.

The ``mlx[cpu]`` wheel for Linux bundles the reference (netlib) BLAS, which is tens of times
slower than OpenBLAS for the matrix products that dominate training (measured: 20 512x512
matmuls take 2.47 s against 0.04 s). MLX calls ``cblas_sgemm`` and friends through the
dynamic linker, so a library preloaded with ``LD_PRELOAD`` wins over the bundled one. The
preload has to be in place before the process starts, hence a re-exec: the CLI calls
``maybe_reexec_with_openblas()`` first thing, and the process replaces itself with
``python -m mlx_tune ...`` with OpenBLAS preloaded. Nothing changes on macOS (MLX uses
Accelerate) or when ``MLX_TUNE_NO_BLAS_FIX=1``.

The marker variable ``MLX_TUNE_BLAS`` records what was decided ("openblas" after the re-exec,
"reference" after the install hint) so that neither happens twice in a process tree.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

MARKER = "MLX_TUNE_BLAS"
DISABLE = "MLX_TUNE_NO_BLAS_FIX"
OVERRIDE = "MLX_TUNE_OPENBLAS"  # an explicit library path (conda, spack, a custom build)

APT_HINT = "sudo apt-get install libopenblas0-pthread"
HINT = ("mlx-tune: MLX is using its bundled reference BLAS (about 30x slower); install OpenBLAS: "
        + APT_HINT)

# ELF e_machine of this interpreter's architecture: a foreign-architecture library (multiarch
# cross packages) would only make the loader print an error and be ignored.
_ELF_MACHINE = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


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


def find_openblas() -> str | None:
    """A system OpenBLAS for this machine: a path, a soname from the linker cache, or None."""
    override = os.environ.get(OVERRIDE)
    if override:
        return override if _elf_matches(override) else None
    for path in _candidates():
        if os.path.isfile(path) and _elf_matches(path):
            return path
    return ctypes.util.find_library("openblas")  # e.g. "libopenblas.so.0"; the loader finds it


def _mlx_cpu_wheel() -> bool:
    """mlx installed from the Linux CPU wheel, which is the one bundling reference BLAS."""
    try:
        importlib.metadata.distribution("mlx-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _interpreter_flags() -> list[str]:
    """-X / -W / -O ... options of this interpreter, so the re-exec behaves the same."""
    try:
        return list(subprocess._args_from_interpreter_flags())  # type: ignore[attr-defined]
    except Exception:  # a private helper: losing flags beats failing to start
        return []


def maybe_reexec_with_openblas(argv: list[str] | None = None, *, module: str = "mlx_tune") -> None:
    """Replace this process with ``python -m <module> <argv>`` with OpenBLAS preloaded.

    Returns (doing nothing, or printing a one-time install hint) where the fix does not
    apply: not Linux, ``MLX_TUNE_NO_BLAS_FIX=1``, already preloaded or decided (marker),
    mlx not from the CPU wheel, or no OpenBLAS on the system. ``module`` is for tests.
    """
    if not sys.platform.startswith("linux") or not sys.executable:
        return
    env = os.environ
    if _truthy(env.get(DISABLE)) or env.get(MARKER) or "openblas" in env.get("LD_PRELOAD", ""):
        return
    if not _mlx_cpu_wheel():
        return
    lib = find_openblas()
    if lib is None:
        env[MARKER] = "reference"  # children inherit it: the hint is printed once per run
        print(HINT, file=sys.stderr, flush=True)
        return
    new_env = dict(env)
    new_env["LD_PRELOAD"] = lib + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    new_env[MARKER] = "openblas"
    args = sys.argv[1:] if argv is None else list(argv)
    print(f"mlx-tune: using system OpenBLAS ({lib}) for MLX's CPU matrix products; "
          f"set {DISABLE}=1 to disable", file=sys.stderr, flush=True)
    sys.stdout.flush()
    try:
        os.execve(sys.executable, [sys.executable, *_interpreter_flags(), "-m", module, *args],
                  new_env)
    except OSError as e:  # exec refused (noexec mount, seccomp): carry on, slower
        env[MARKER] = "reexec-failed"
        print(f"mlx-tune: could not restart with OpenBLAS ({e}); continuing with MLX's bundled "
              "BLAS", file=sys.stderr, flush=True)


# -- what is in use, for `mlx-tune doctor` ---------------------------------------------

_BLAS_NAMES = ("libopenblas", "libblas", "libcblas", "libmkl", "libblis", "accelerate")


def _maps() -> list[tuple[int, int, str]]:
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16), parts[5].strip()))
    except OSError:
        pass
    return out


def _classify(path: str) -> str:
    real = os.path.realpath(path).lower()
    for key, kind in (("openblas", "openblas"), ("mkl", "mkl"), ("blis", "blis"),
                      ("accelerate", "accelerate")):
        if key in real:
            return kind
    return "reference" if "libblas" in os.path.basename(real) or "mlx_cpu.libs" in real \
        else "unknown"


def _bundled_blas() -> str | None:
    """The reference BLAS inside the mlx CPU wheel (site-packages/mlx_cpu.libs/libblas-*.so*)."""
    spec = importlib.util.find_spec("mlx")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(glob.glob(str(Path(loc).parent / "mlx_cpu.libs" / "libblas*.so*")))
        if found:
            return found[0]
    return None


def blas_status() -> dict[str, Any]:
    """Which BLAS MLX's CPU backend calls in this process, and why.

    Keys: kind ("openblas" | "accelerate" | "mkl" | "blis" | "reference" | "unknown"),
    library (path or None), mapped (BLAS-like libraries mapped into the process),
    ld_preload, marker, fix_disabled, system_openblas, mlx_cpu_wheel.
    """
    status: dict[str, Any] = {
        "kind": "unknown", "library": None, "mapped": [],
        "ld_preload": os.environ.get("LD_PRELOAD"), "marker": os.environ.get(MARKER),
        "fix_disabled": _truthy(os.environ.get(DISABLE)),
        "system_openblas": None, "mlx_cpu_wheel": False,
    }
    if sys.platform == "darwin":
        status.update(kind="accelerate", library="Accelerate.framework")
        return status
    maps = _maps()
    status["mapped"] = sorted({p for _, _, p in maps
                               if any(n in os.path.basename(p).lower() for n in _BLAS_NAMES)})
    status["mlx_cpu_wheel"] = _mlx_cpu_wheel()
    status["system_openblas"] = find_openblas() if sys.platform.startswith("linux") else None
    # A cblas_sgemm in the global symbol scope (the preload, or a library loaded with
    # RTLD_GLOBAL) is the one MLX binds to; otherwise MLX uses the library it links itself.
    try:
        addr = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except (AttributeError, OSError):
        addr = None
    provider = next((p for lo, hi, p in maps if addr is not None and lo <= addr < hi), None)
    if provider:
        status.update(kind=_classify(provider), library=provider)
    elif status["mlx_cpu_wheel"]:
        mapped = [p for p in status["mapped"] if "mlx_cpu.libs" in p and "libblas" in p]
        status.update(kind="reference", library=mapped[0] if mapped else _bundled_blas())
    return status


def blas_advice(status: dict[str, Any]) -> str | None:
    """One line of advice for a slow BLAS, or None when nothing is to be done."""
    if status["kind"] != "reference":
        return None
    if not status["system_openblas"]:
        return f"install OpenBLAS ({APT_HINT}); mlx-tune then preloads it by itself"
    if status["fix_disabled"]:
        return f"{status['system_openblas']} is installed but {DISABLE}=1 keeps it unused"
    return (f"run through the mlx-tune command (it preloads OpenBLAS), or set "
            f"LD_PRELOAD={status['system_openblas']}")
