"""Give MLX's Linux CPU backend a fast BLAS.

The ``mlx[cpu]`` wheel for Linux bundles the reference (netlib) BLAS, which is tens of times
slower than OpenBLAS for the matrix products that dominate training (measured: 20 512x512
matmuls take 2.47 s against 0.04 s). MLX calls ``cblas_sgemm`` and friends through the
dynamic linker, so a library preloaded with ``LD_PRELOAD`` wins over the bundled one. The
preload has to be in place before the process starts, hence a re-exec: the CLI calls
``maybe_reexec_with_openblas()`` first thing, and the process replaces itself with a fresh
interpreter running ``mlx_tune`` with OpenBLAS preloaded. Nothing changes on macOS (MLX uses
Accelerate) or when ``MLX_TUNE_NO_BLAS_FIX=1``.

Which OpenBLAS: ``blas_choice`` (each candidate proven in a child process first). After the
re-exec the process checks that the preload really provides ``cblas_sgemm`` and says so if
not, rather than run 10x slower under a notice that claims OpenBLAS.

The marker variable ``MLX_TUNE_BLAS`` records what was decided ("openblas" after the re-exec,
"reference" after the install hint) so that neither happens twice in a process tree.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mlx_tune.system import pip_openblas
from mlx_tune.system.blas_choice import (OVERRIDE, OpenBlas, choose_openblas,  # noqa: F401
                                         find_openblas)  # re-exported: tests, scripts

MARKER = "MLX_TUNE_BLAS"
DISABLE = "MLX_TUNE_NO_BLAS_FIX"

APT_HINT = "sudo apt-get install libopenblas0-pthread"
PIP_HINT = f"pip install {pip_openblas.DIST}"
HINT = ("mlx-tune: MLX is using its bundled reference BLAS (about 30x slower); install "
        f"OpenBLAS: {PIP_HINT} (or {APT_HINT})")

def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def preload_env(lib: OpenBlas, env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's) with ``lib`` preloaded and marked."""
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = lib.path + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    if lib.lib_dir:
        env["LD_LIBRARY_PATH"] = lib.lib_dir + (
            ":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    if lib.source.startswith("pip") and not (env.get("OPENBLAS_NUM_THREADS")
                                             or env.get("OMP_NUM_THREADS")):
        # The pip builds' worker threads collapse when a core is taken by anyone else (the
        # quickstart on a loaded 2-core machine: 220 tokens/s with 2 threads, 1,418 with 1;
        # Debian's build held up). Half the cores, as the torch backend does: at most ~2x
        # lost on an idle machine, never a collapse. OPENBLAS_NUM_THREADS overrides it.
        env["OPENBLAS_NUM_THREADS"] = str(pip_threads())
    env[MARKER] = "openblas"
    return env


def pip_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


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


# Run `module` as __main__ without the current directory on the import path: `python -m`
# would put it first, and a yaml.py (or any module we import) lying in the folder a user
# runs from would execute as code. The package's own parent goes last, so a source checkout
# run with `python -m mlx_tune` still finds itself, and never shadows an installed module.
_BOOT = ("import sys\n"
         "if sys.path and sys.path[0] in ('', '.'): del sys.path[0]\n"
         "sys.path.append({parent!r})\n"
         "import runpy\n"
         "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")


def exec_args(module: str, args: list[str], *, isolate: bool = True) -> list[str]:
    """The argv of the re-exec'd interpreter."""
    head = [sys.executable, *_interpreter_flags()]
    if not isolate:
        return [*head, "-m", module, *args]
    parent = str(Path(__file__).resolve().parents[2])  # the folder holding mlx_tune/
    return [*head, "-c", _BOOT.format(parent=parent, module=module), *args]


def maybe_reexec_with_openblas(argv: list[str] | None = None, *, module: str = "mlx_tune",
                               isolate: bool = True, notice: bool = True) -> None:
    """Replace this process with a fresh interpreter running ``module`` with OpenBLAS
    preloaded; ``isolate`` keeps the current directory off its import path (``False``
    means plain ``python -m module``, for pytest and tests' probes that live there).

    Returns (doing nothing, or printing a one-time install hint) where the fix does not
    apply: not Linux, ``MLX_TUNE_NO_BLAS_FIX=1``, already preloaded or decided (marker),
    mlx not from the CPU wheel, or no OpenBLAS anywhere. ``notice=False`` does the same
    silently (the commands whose speed the BLAS is not about).
    """
    if not sys.platform.startswith("linux") or not sys.executable:
        return
    env = os.environ
    if env.get(MARKER) == "openblas":
        _check_preload_in_use()
        return
    if _truthy(env.get(DISABLE)) or env.get(MARKER) or "openblas" in env.get("LD_PRELOAD", ""):
        return
    if not _mlx_cpu_wheel():
        return
    choice = choose_openblas()
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if notice else (lambda _: None)
    for line in choice.passed_over:
        say(f"mlx-tune: not using {line}")
    lib = choice.lib
    if lib is None:
        env[MARKER] = "reference"  # children inherit it: the hint is printed once per run
        say(HINT)
        return
    args = sys.argv[1:] if argv is None else list(argv)
    say(f"mlx-tune: using {lib.describe()} for MLX's CPU matrix products; "
        f"set {DISABLE}=1 to disable")
    sys.stdout.flush()
    try:
        os.execve(sys.executable, exec_args(module, args, isolate=isolate), preload_env(lib))
    except OSError as e:  # exec refused (noexec mount, seccomp): carry on, slower
        env[MARKER] = "reexec-failed"
        print(f"mlx-tune: could not restart with OpenBLAS ({e}); continuing with MLX's bundled "
              "BLAS", file=sys.stderr, flush=True)


def _check_preload_in_use() -> None:
    """After the re-exec: the preloaded library must be what provides cblas_sgemm here. The
    candidate passed the same check in a child; this catches what differs in this process
    (a changed LD_PRELOAD, a library replaced since), and says so rather than run 10x
    slower under a notice that claims OpenBLAS."""
    if os.environ.get("LD_PRELOAD") is None:
        return
    provider = _cblas_provider(_maps())
    if provider is None or _classify(provider) != "openblas":
        os.environ[MARKER] = "preload-missing"
        print(f"mlx-tune: the preloaded OpenBLAS ({os.environ['LD_PRELOAD'].split(':')[0]}) is "
              "not loaded in this process, so MLX uses its bundled reference BLAS (about 30x "
              f"slower); `mlx-tune doctor` says why", file=sys.stderr, flush=True)


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


def _source_of(path: str) -> str:
    """Where the OpenBLAS at ``path`` came from, as the notice and doctor say it."""
    real = os.path.realpath(path)
    override = os.environ.get(OVERRIDE)
    if override and override.strip().lower() != "pip" and os.path.realpath(override) == real:
        return OVERRIDE
    for path, dist, version in pip_openblas.wheel_openblases():
        if os.path.realpath(path) == real:
            return f"pip ({dist} {version})"
    return "system" if real.startswith(("/usr/", "/lib")) else "a preloaded library"


def _cblas_provider(maps: list[tuple[int, int, str]]) -> str | None:
    """The library whose cblas_sgemm is in the global symbol scope (the preload, or one
    loaded with RTLD_GLOBAL): the one MLX binds to. None: MLX uses the one it links."""
    try:
        addr = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None
    return next((p for lo, hi, p in maps if addr is not None and lo <= addr < hi), None)


def blas_status() -> dict[str, Any]:
    """Which BLAS MLX's CPU backend calls in this process, and why.

    Keys: kind ("openblas" | "accelerate" | "mkl" | "blis" | "reference" | "unknown"),
    library (path or None), source (where an OpenBLAS in use came from), mapped (BLAS-like
    libraries mapped into the process), ld_preload, marker, fix_disabled, available (the
    OpenBlas mlx-tune would preload, or None), passed_over (each candidate it would not
    use, with the cause), mlx_cpu_wheel.
    """
    status: dict[str, Any] = {
        "kind": "unknown", "library": None, "source": None, "mapped": [],
        "ld_preload": os.environ.get("LD_PRELOAD"), "marker": os.environ.get(MARKER),
        "fix_disabled": _truthy(os.environ.get(DISABLE)),
        "available": None, "passed_over": [], "mlx_cpu_wheel": False,
    }
    if sys.platform == "darwin":
        status.update(kind="accelerate", library="Accelerate.framework")
        return status
    maps = _maps()
    status["mapped"] = sorted({p for _, _, p in maps
                               if any(n in os.path.basename(p).lower() for n in _BLAS_NAMES)})
    status["mlx_cpu_wheel"] = _mlx_cpu_wheel()
    if sys.platform.startswith("linux"):
        choice = choose_openblas()
        status["available"], status["passed_over"] = choice.lib, list(choice.passed_over)
    provider = _cblas_provider(maps)
    if provider:
        status.update(kind=_classify(provider), library=provider)
        if status["kind"] == "openblas":
            status["source"] = _source_of(provider)
    elif status["mlx_cpu_wheel"]:
        mapped = [p for p in status["mapped"] if "mlx_cpu.libs" in p and "libblas" in p]
        status.update(kind="reference", library=mapped[0] if mapped else _bundled_blas())
    return status


def blas_advice(status: dict[str, Any]) -> str | None:
    """One line of advice for a slow BLAS, or None when nothing is to be done."""
    if status["kind"] != "reference":
        return None
    lib: OpenBlas | None = status["available"]
    if lib is None and status.get("passed_over"):
        # Something is installed but unusable: installing it again would not help.
        return "no installed OpenBLAS can be used: " + "; ".join(status["passed_over"])
    if lib is None:
        return f"install OpenBLAS ({PIP_HINT}, or {APT_HINT}); mlx-tune then preloads it by itself"
    if status["fix_disabled"]:
        return f"{lib.describe()} is installed but {DISABLE}=1 keeps it unused"
    return "run through the mlx-tune command (it preloads OpenBLAS), or set " + " ".join(
        f"{k}={v}" for k, v in preload_env(lib, {}).items() if k != MARKER)
