"""`mlx-tune doctor`: what this machine will train with, and what to fix first.

Each check is one line: OK, INFO (worth knowing), WARN (works, but slower or riskier than
it should be; a hint follows) or FAIL (a required dependency is missing: training cannot
start). The exit code is 1 when anything failed, so scripts can gate on it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mlx_tune import __version__
from mlx_tune.system.blas import blas_advice, blas_status
from mlx_tune.exit_codes import EXIT_ERROR, EXIT_OK

# (distribution name, what it is for). Versions come from package metadata, so listing
# them costs no imports.
REQUIRED = [
    ("mlx", "array framework (the mlx backend)"),
    ("mlx-lm", "model definitions, loading, generation"),
    ("numpy", "batches and checkpoints"),
    ("safetensors", "weights and checkpoints"),
    ("huggingface-hub", "model download and cache"),
    ("tensorboardX", "TensorBoard logs"),
    ("rich", "the live dashboard"),
    ("pyyaml", "spec files"),
    ("transformers", "tokenizers and chat templates"),
]
OPTIONAL = [
    ("torch", "the torch backend"),
    ("peft", "LoRA on the torch backend"),
    ("bitsandbytes", "4/8-bit QLoRA on the torch backend (NVIDIA)"),
    ("wandb", "the Weights & Biases tracker (report_to: [wandb])"),
]
TORCH_EXTRA = "pip install 'mlx-tune[torch]'"
OPTIONAL_FIX = {"wandb": "pip install 'mlx-tune[wandb]'"}

GIB = 1024 ** 3


@dataclass
class Check:
    status: str             # "OK" | "INFO" | "WARN" | "FAIL"
    name: str
    value: str
    hint: str | None = None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sysctl(key: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _gib(n: float | int | None) -> str:
    return f"{n / GIB:.1f} GiB" if n else "unknown"


def _total_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- the checks ------------------------------------------------------------------------

def check_platform() -> list[Check]:
    machine = platform.machine()
    py = f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})"
    checks = [Check("OK", "mlx-tune", __version__), Check("OK", "python", py)]
    if sys.platform == "darwin":
        chip = _sysctl("machdep.cpu.brand_string") or "unknown chip"
        where = f"macOS {platform.mac_ver()[0]} {machine}, {chip}"
        if machine == "arm64":
            checks.append(Check("OK", "platform", f"{where} (Apple Silicon)"))
        elif _sysctl("sysctl.proc_translated") == "1":
            checks.append(Check("WARN", "platform", f"{where} under Rosetta",
                                "this Python is x86_64 running under Rosetta: install an arm64 "
                                "Python (python.org, Homebrew, uv) so MLX can use the GPU"))
        else:
            checks.append(Check("WARN", "platform", where,
                                "MLX's GPU backend needs Apple Silicon; on an Intel Mac "
                                "training runs on the CPU"))
    else:
        checks.append(Check("OK", "platform", f"{platform.system()} {platform.release()} "
                                              f"{machine}"))
    return checks


def check_mlx() -> tuple[list[Check], dict[str, Any]]:
    """MLX version and device; returns the device info for the memory check."""
    try:
        import mlx.core as mx
    except Exception as e:  # ImportError, or a broken native library
        return [Check("FAIL", "mlx", f"cannot import mlx ({type(e).__name__}: {e})",
                      "pip install mlx (macOS) or pip install 'mlx[cpu]' (Linux)")], {}
    backend = next((f"{d} {_version(d)}" for d in ("mlx-metal", "mlx-cuda", "mlx-cpu")
                    if _version(d)), None)
    version = mx.__version__ + (f" ({backend})" if backend else "")
    metal = bool(getattr(getattr(mx, "metal", None), "is_available", lambda: False)())
    cuda = bool(getattr(getattr(mx, "cuda", None), "is_available", lambda: False)())
    info: dict[str, Any] = {}
    try:
        info = dict(mx.device_info()) if hasattr(mx, "device_info") else \
            dict(mx.metal.device_info()) if metal else {}
    except Exception:  # device_info raises on some backends/versions; it is only extra detail
        info = {}
    device = mx.default_device()
    device = getattr(device.type, "name", device.type)  # "cpu" / "gpu", not Device(cpu, 0)
    name = info.get("device_name") or info.get("architecture") or ""
    value = (f"default device {device}" + (f" ({name})" if name else "")
             + f"; metal {'yes' if metal else 'no'}; cuda {'yes' if cuda else 'no'}")
    checks = [Check("OK", "mlx version", version)]
    if metal or cuda:
        checks.append(Check("OK", "mlx device", value))
    else:
        checks.append(Check("WARN", "mlx device", value,
                            "MLX computes on the CPU here: fine for smoke tests and tiny "
                            "models; for real models use Apple Silicon, or --backend torch "
                            "on an NVIDIA GPU"))
    return checks, info


def check_memory(info: dict[str, Any]) -> list[Check]:
    total = info.get("memory_size") or _total_ram()
    parts = [f"{_gib(total)} total" + (" unified" if sys.platform == "darwin" else "")]
    working = info.get("max_recommended_working_set_size")
    if working:
        parts.append(f"{_gib(working)} recommended GPU working set")
    available = _available_ram()
    if available:
        parts.append(f"{_gib(available)} available now")
    value = ", ".join(parts)
    if total and total < 8 * GIB:
        return [Check("WARN", "memory", value, "little memory for 7B models: pick a 0.5-3B "
                      "model or quantize: 4, and a small batch_size or max_length")]
    return [Check("OK", "memory", value)]


def check_memory_limits(info: dict[str, Any], *, platform: str = sys.platform,
                        env: Any = os.environ) -> list[Check]:
    """What a run sets (backends/mlx/memory.py), what this process holds now, and on
    macOS the GPU watchdog's workaround."""
    from mlx_tune.config.schema import MemorySpec
    from mlx_tune.system.gpu_watchdog import WATCHDOG_ENV, watchdog_status
    from mlx_tune.system.memory import resident_bytes
    from mlx_tune.training.memory import CACHE_SHARE

    fraction = MemorySpec().limit_fraction
    cache = (f"buffer cache bounded at {CACHE_SHARE:.0%} of the memory budget "
             "(memory.cache_limit_gb)")
    working = info.get("max_recommended_working_set_size")
    if working:
        value = (f"a run wires {_gib(working)} (the recommended working set, as mlx-lm does), "
                 f"caps MLX at {_gib(fraction * working)} (memory.limit_fraction {fraction:g}); "
                 f"{cache}; all restored when it ends")
    else:
        value = (f"{cache}; wired limit and memory cap: not applicable here (no Metal "
                 "working set)")
    checks = [Check("OK", "memory limits", value)]
    now = []
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        now.append(f"active {mx.get_active_memory() / 2**20:,.0f} MB, cache "
                   f"{mx.get_cache_memory() / 2**20:,.0f} MB")
    resident = resident_bytes()
    if resident is not None:
        now.append(f"resident {resident / 2**20:,.0f} MB")
    if now:
        checks.append(Check("INFO", "memory now", "this process: " + ", ".join(now)))
    if platform == "darwin":
        on, line = watchdog_status(env)
        checks.append(Check("OK" if on else "WARN", "gpu watchdog", line, None if on else
                            f"export {WATCHDOG_ENV}=1 in the shell that starts training"))
    return checks


def check_blas() -> list[Check]:
    s = blas_status()
    kind, lib = s["kind"], s["library"]
    value = kind + (f" from {s['source']}" if s.get("source") else "") \
        + (f" ({lib})" if lib and lib != "Accelerate.framework" else "")
    if kind == "accelerate":
        return [Check("OK", "cpu blas", "Accelerate (macOS)")]
    # Each library passed over (a bad MLX_TUNE_OPENBLAS, a system one that cannot be opened,
    # a pip one without its private folder), named with its cause.
    passed = [Check("WARN", "cpu blas", f"not using {line}") for line in s.get("passed_over", ())]
    if kind == "reference":
        return passed + [Check("WARN", "cpu blas", value + ": slow CPU matrix products",
                               blas_advice(s))]
    if kind == "unknown":
        return [Check("INFO", "cpu blas", "unknown (mlx is not the Linux CPU wheel; it uses "
                                          "the BLAS it was built with)")]
    return passed + [Check("OK", "cpu blas", value)]


def check_dependencies(import_torch: bool = True) -> list[Check]:
    checks = []
    for dist, what in REQUIRED:
        v = _version(dist)
        checks.append(Check("OK", dist, f"{v}  {what}") if v else
                      Check("FAIL", dist, f"missing  {what}", f"pip install {dist}"))
    for dist, what in OPTIONAL:
        v = _version(dist)
        if not v:
            checks.append(Check("INFO", dist, f"not installed  optional: {what}",
                                OPTIONAL_FIX.get(dist, f"{TORCH_EXTRA} for the torch backend")))
            continue
        detail = ""
        if dist == "torch" and import_torch:
            detail = _torch_devices()
        checks.append(Check("OK", dist, f"{v}  {what}{detail}"))
    return checks


def _torch_devices() -> str:
    """CUDA / MPS availability as torch sees it (imports torch: a few seconds)."""
    try:
        import torch
    except Exception as e:
        return f"; import failed ({type(e).__name__}: {e})"
    try:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return f"; CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}" + \
                (f" (+{n - 1} more)" if n > 1 else "")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "; MPS available"
    except Exception as e:  # a driver mismatch surfaces here, not at import
        return f"; CUDA check failed ({type(e).__name__}: {e})"
    return "; no CUDA (CPU only)"


def check_hf_cache() -> list[Check]:
    from mlx_tune.models.hub import hf_cache_dir, hf_offline

    cache = Path(hf_cache_dir())
    models = len(list(cache.glob("models--*"))) if cache.is_dir() else 0
    value = f"{cache} ({models} model{'s' if models != 1 else ''} cached)" if cache.is_dir() \
        else f"{cache} (not created yet)"
    checks = []
    probe = next((p for p in (cache, *cache.parents) if p.exists()), None)
    free = shutil.disk_usage(probe).free if probe else None
    if free is not None:
        value += f"; {_gib(free)} free"
    if free is not None and free < 20 * GIB:
        checks.append(Check("WARN", "hf cache", value, "a 7B model takes about 15 GB (4 GB "
                            "pre-quantized): free some space or point HF_HUB_CACHE elsewhere"))
    else:
        checks.append(Check("OK", "hf cache", value))
    if hf_offline():
        checks.append(Check("INFO", "hf offline", "HF_HUB_OFFLINE is set: models must already "
                            "be in the cache", "unset HF_HUB_OFFLINE to download models"))
    else:
        checks.append(Check("OK", "hf offline", "HF_HUB_OFFLINE not set: missing models are "
                                                "downloaded on first use"))
    return checks


def collect_checks(*, import_torch: bool = True) -> list[Check]:
    """Every check, in display order. MLX is imported before the BLAS check so that the
    library it links is mapped and can be reported."""
    checks = check_platform()
    mlx_checks, info = check_mlx()
    checks += mlx_checks + check_memory(info) + check_memory_limits(info) + check_blas()
    checks += check_dependencies(import_torch=import_torch) + check_hf_cache()
    return checks


_STYLE = {"OK": "green", "INFO": "cyan", "WARN": "yellow", "FAIL": "bold red"}


def run_doctor(console: Any, *, collect: Callable[[], list[Check]] = collect_checks) -> int:
    """Print every check to a rich console; 1 if a required dependency is missing, else 0."""
    from rich.text import Text

    checks = collect()
    width = max(len(c.name) for c in checks)
    console.print(Text("mlx-tune doctor", style="bold"))
    for c in checks:
        console.print(Text.assemble((f"{c.status:<4}", _STYLE.get(c.status, "")), "  ",
                                    (c.name.ljust(width), "bold"), "  ", c.value))
        if c.hint:
            console.print(Text.assemble(" " * (width + 8), ("hint: ", "dim"), c.hint))
    failed = [c.name for c in checks if c.status == "FAIL"]
    warned = sum(c.status == "WARN" for c in checks)
    if failed:
        console.print(Text(f"missing: {', '.join(failed)}; training cannot start",
                           style="bold red"))
        return EXIT_ERROR
    console.print(Text(f"ready to train ({warned} warning{'s' if warned != 1 else ''})",
                       style="green"))
    return EXIT_OK
