"""Model resolution: what the user typed after ``--model`` -> a local directory.

Three spellings are accepted, tried in this order:

1. an existing local directory (must hold ``config.json``);
2. ``org/name``: a Hugging Face repo id, found in (or fetched into) the Hugging Face cache
   through ``huggingface_hub.snapshot_download``, so the cache is shared with every other
   tool on the machine;
3. a bare name: an alias from the table ``mlx_tune/configs/models.yaml`` (case-insensitive).

Errors are ``ModelError`` with one line that says what to do next. Nothing here imports
mlx or torch: resolution runs before the backend loads, so a typo costs a second.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from mlx_tune.errors import UserError, first_line

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# The alias table is package data (pyproject ships mlx_tune/configs/*.yaml): an installed
# mlx-tune cannot see the repository's configs/ folder, which only holds a link to this file.
ALIASES_PATH = PACKAGE_DIR / "configs" / "models.yaml"

# What a training run needs from a repo: configs, weights, tokenizer files and chat
# templates. Not *.bin / *.pth / *.gguf / *.onnx, which would multiply the download.
_BASE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
# Custom modelling code only when the user allowed it to run.
_REMOTE_CODE_PATTERNS = ["*.py"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(UserError, ValueError):
    """A model that cannot be resolved; the message is one line meant for the user."""


class ModelNotCachedError(ModelError):
    """Offline (or the Hub unreachable) and the repo is not in the local cache."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path                      # local directory holding config.json
    repo_id: str | None             # the Hugging Face repo it came from, if any
    alias: str | None               # the canonical alias name, if one was used
    prequantized_bits: int | None   # bits of MLX-quantized weights in the directory, if any


# -- the alias table -------------------------------------------------------------

def load_aliases(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The alias table, validated: ``{alias: {repo|path, mlx_4bit?, gated?, description?}}``."""
    path = Path(path) if path is not None else ALIASES_PATH
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ModelError(f"{path}: cannot read the model alias table ({e})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: the model alias table must map alias names to entries")
    for name, entry in raw.items():
        if not isinstance(entry, dict) or ("repo" in entry) == ("path" in entry):
            raise ModelError(f"{path}: alias '{name}' needs exactly one of 'repo' or 'path'")
    return {str(k): v for k, v in raw.items()}


def _lookup_alias(name: str, aliases: dict[str, dict[str, Any]]) -> str:
    by_lower = {k.lower(): k for k in aliases}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.4)
    listed = [by_lower[c] for c in close] or sorted(aliases, key=str.lower)
    label = "closest aliases" if close else "known aliases"
    raise ModelError(f"unknown model '{name}': not a local directory, a Hugging Face id or an "
                     f"alias ({label}: {', '.join(listed)}); an 'org/name' Hugging Face id or a "
                     "local model directory works too")


# -- the Hugging Face cache --------------------------------------------------------

def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_offline() -> bool:
    """Offline as huggingface_hub sees it, or as the environment says now.

    huggingface_hub reads HF_HUB_OFFLINE once at import; reading the environment again
    catches a variable set later in the process (the CLI's --offline, a test).
    """
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or _truthy(os.environ.get("HF_HUB_OFFLINE")) \
        or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


# Seconds the Hub gets to answer its first request. huggingface_hub's own metadata calls
# have no timeout, so a network that swallows packets (a captive portal, a dead proxy)
# would hang the run before its first line; past this bound the cache is used instead.
HUB_TIMEOUT_ENV = "MLX_TUNE_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 20.0


def hub_timeout() -> float:
    raw = os.environ.get(HUB_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_HUB_TIMEOUT
    except ValueError:
        value = DEFAULT_HUB_TIMEOUT
    return value if value > 0 else DEFAULT_HUB_TIMEOUT


def hub_answers(repo_id: str, repo_type: str | None, timeout: float) -> str | None:
    """None when the Hub answered about ``repo_id`` within ``timeout`` seconds (even "not
    found": snapshot_download then reports it), else why it did not, in a few words."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    try:
        huggingface_hub.HfApi().repo_info(repo_id, repo_type=repo_type, timeout=timeout)
    except HfHubHTTPError as e:  # an HTTP answer: the repo's own error (404, gated, ...)
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is None or status >= 500:
            return f"the Hub answered with an error ({status or type(e).__name__})"
        return None
    except Exception as e:  # noqa: BLE001 - timeouts and network errors of the http stack
        if "timeout" in type(e).__name__.lower():
            return f"no answer within {timeout:g} s"
        return first_line(e)
    return None


def fetch_snapshot(repo_id: str, *, repo_type: str | None, allow_patterns: list[str],
                   log: Callable[[str], None] = print) -> str:
    """The local folder of a Hub repo's snapshot: fetched or updated when the Hub answers
    within ``hub_timeout()``, else (and offline) the cached one. Raises huggingface_hub's
    errors: ``LocalEntryNotFoundError`` when the Hub is out of reach and nothing is cached."""
    import huggingface_hub

    if hf_offline():
        return huggingface_hub.snapshot_download(repo_id, repo_type=repo_type,
                                                 allow_patterns=allow_patterns,
                                                 local_files_only=True)
    timeout = hub_timeout()
    problem = hub_answers(repo_id, repo_type, timeout)
    if problem is not None:
        folder = huggingface_hub.snapshot_download(repo_id, repo_type=repo_type,
                                                   allow_patterns=allow_patterns,
                                                   local_files_only=True)
        log(f"the Hugging Face Hub cannot be reached ({problem}): using the cached snapshot "
            f"of '{repo_id}' ({HUB_TIMEOUT_ENV} sets the wait)")
        return folder
    return huggingface_hub.snapshot_download(repo_id, repo_type=repo_type,
                                             allow_patterns=allow_patterns,
                                             local_files_only=False, etag_timeout=timeout)


def hf_cache_dir() -> str:
    """Where huggingface_hub keeps repos (HF_HUB_CACHE; default ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _not_cached(repo_id: str, offline: bool) -> ModelNotCachedError:
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
    folder = "models--" + repo_id.replace("/", "--")
    return ModelNotCachedError(
        f"model '{repo_id}' is not in the local Hugging Face cache ({hf_cache_dir()}) and {why}: "
        f"on a machine with network run `hf download {repo_id}` (or `huggingface-cli download "
        f"{repo_id}`) and copy its {folder} folder into that cache, or copy the model "
        "directory here and pass its path to --model")


def _snapshot(repo_id: str, *, trust_remote_code: bool,
              log: Callable[[str], None] = print) -> Path:
    """Locate (offline) or fetch (online) a repo snapshot; one-line ModelError on failure."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = hf_offline()
    patterns = _BASE_PATTERNS + (_REMOTE_CODE_PATTERNS if trust_remote_code else [])
    try:
        folder = fetch_snapshot(repo_id, repo_type=None, allow_patterns=patterns, log=log)
    except LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x only
            raise ModelNotCachedError(
                f"the cached snapshot of model '{repo_id}' in {hf_cache_dir()} is incomplete "
                f"and cannot be completed now: re-run `hf download {repo_id}` with network"
            ) from None
        # Offline, or the Hub unreachable, and nothing cached.
        raise _not_cached(repo_id, offline) from None
    except GatedRepoError:
        raise ModelError(f"model '{repo_id}' is gated: accept its license at "
                         f"https://huggingface.co/{repo_id} and log in with `hf auth login`"
                         ) from None
    except RepositoryNotFoundError:
        raise ModelError(f"model '{repo_id}' was not found on the Hugging Face Hub (check the "
                         "spelling; a private repo needs `hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelError(f"model '{repo_id}': the requested revision does not exist") from None
    except (HfHubHTTPError, OSError) as e:
        first = first_line(e)
        raise ModelError(f"could not fetch model '{repo_id}': {first}") from None
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ModelError(f"model '{repo_id}' in {path} has no config.json (a partial download?); "
                         f"re-run `hf download {repo_id}`")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"model '{repo_id}' in {path} has no *.safetensors weights (a partial "
                         f"download, or a repo without safetensors); re-run `hf download "
                         f"{repo_id}` or convert the weights to safetensors")
    check_model_files(path)
    return path


# Any one of these lets transformers build a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_files(path: Path) -> None:
    """config.json must be a JSON object: one line naming the file, before any weights
    load (a list there otherwise fails deep inside transformers or mlx-lm)."""
    config = path / "config.json"
    try:
        obj = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{config}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{config}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{config}: expected a JSON object (the model's settings), got "
                         f"{type(obj).__name__}")



def check_tokenizer_files(path: Path) -> None:
    """A directory without tokenizer files fails deep inside transformers: say so first."""
    if not any((path / n).is_file() for n in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise ModelError(f"model directory {path} has no tokenizer files (expected one of "
                         f"{', '.join(TOKENIZER_FILES)})")


# -- the pieces together -----------------------------------------------------------

def _quantized_bits(path: Path) -> int | None:
    """Bits of MLX-quantized weights, read from config.json (mlx-lm writes 'quantization')."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = config.get("quantization") or config.get("quantization_config")
    bits = q.get("bits") if isinstance(q, dict) else None
    return bits if isinstance(bits, int) and not isinstance(bits, bool) else None


def _local_dir(path: Path) -> ResolvedModel:
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json; expected a Hugging Face "
                         "style model directory (config.json, *.safetensors, tokenizer files)")
    check_model_files(path)
    return ResolvedModel(path=path, repo_id=None, alias=None,
                         prequantized_bits=_quantized_bits(path))


def _looks_like_path(name: str) -> bool:
    """Spelled like a filesystem path rather than an id or alias."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", ".."):
        return True
    return ("/" in name or os.sep in name) and not _REPO_ID.match(name)


def resolve_model(name: str, *, quantize: int | None, backend: str,
                  trust_remote_code: bool = False,
                  log: Callable[[str], Any] = print) -> ResolvedModel:
    """Turn ``--model NAME`` into a local model directory.

    ``backend`` is the backend that will load the model ("mlx" or "torch", already
    resolved from "auto"): only the mlx backend can use an alias's pre-quantized MLX
    variant, so with ``quantize`` set on another backend the original repo is used.
    """
    name = (name or "").strip()
    if not name:
        raise ModelError("no model given: pass --model with a Hugging Face id (org/name), an "
                         "alias from configs/models.yaml, or a local directory")
    local = Path(name).expanduser()
    if local.is_dir():
        return _local_dir(local.resolve())
    if local.exists():
        raise ModelError(f"model path {local} is a file; expected a model directory holding "
                         "config.json")
    if _looks_like_path(name):
        raise ModelError(f"model directory {local} does not exist")
    if "/" in name:
        path = _snapshot(name, trust_remote_code=trust_remote_code, log=log)
        return ResolvedModel(path=path, repo_id=name, alias=None,
                             prequantized_bits=_quantized_bits(path))

    aliases = load_aliases()
    alias = _lookup_alias(name, aliases)
    entry = aliases[alias]
    if "path" in entry:
        path = (PACKAGE_DIR / entry["path"]).resolve()
        if not path.is_dir():
            raise ModelError(f"model '{alias}' should be embedded at {path} but is missing from "
                             "this installation; reinstall mlx-tune")
        resolved = _local_dir(path)
        return ResolvedModel(path=resolved.path, repo_id=None, alias=alias,
                             prequantized_bits=resolved.prequantized_bits)

    repo = entry["repo"]
    variant = entry.get(f"mlx_{quantize}bit") if quantize and backend == "mlx" else None
    if variant:
        try:
            path = _snapshot(variant, trust_remote_code=trust_remote_code, log=log)
        except ModelNotCachedError as e:
            # Offline with only the original cached: quantizing on load still works.
            try:
                path = _snapshot(repo, trust_remote_code=trust_remote_code, log=log)
            except ModelError:
                raise e from None
            log(f"model: {variant} is not cached; using {repo} and quantizing to {quantize} "
                "bits on load")
            return ResolvedModel(path=path, repo_id=repo, alias=alias,
                                 prequantized_bits=_quantized_bits(path))
        bits = _quantized_bits(path) or quantize
        log(f"model: {alias} -> {variant} (pre-quantized {bits}-bit MLX weights; no quantization "
            "on load)")
        return ResolvedModel(path=path, repo_id=variant, alias=alias, prequantized_bits=bits)

    path = _snapshot(repo, trust_remote_code=trust_remote_code, log=log)
    log(f"model: {alias} -> {repo}")
    return ResolvedModel(path=path, repo_id=repo, alias=alias,
                         prequantized_bits=_quantized_bits(path))
