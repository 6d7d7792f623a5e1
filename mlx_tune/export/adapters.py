"""`mlx-tune convert-adapter`: mlx-lm adapters <-> peft adapters, LoRA and DoRA.

The two formats describe the same update, y = W x + s * B A x (DoRA: rescaled row-wise
by m / ||W + s B A||), with different names and layouts:

============================  ===================================  ===========================
                              mlx-lm (LoRALinear / DoRALinear)     peft (LoraModel)
============================  ===================================  ===========================
weights file                  adapters.safetensors                 adapter_model.safetensors
A                             ``<path>.lora_a``  [in, r]           ``base_model.model.<path>.lora_A.weight``  [r, in]
B                             ``<path>.lora_b``  [r, out]          ``base_model.model.<path>.lora_B.weight``  [out, r]
DoRA magnitude                ``<path>.m``  [out]                  ``base_model.model.<path>.lora_magnitude_vector``  [out]
scale s                       ``lora_parameters.scale``            ``lora_alpha / r`` (``/ sqrt(r)`` with rslora)
which blocks                  the last ``num_layers``              ``layers_to_transform`` (None = all)
which modules                 ``lora_parameters.keys``             ``target_modules`` (suffix match)
============================  ===================================  ===========================

So A and B are transposed, the scale becomes alpha = s * r, and the magnitude vector is
the same numbers. Module paths are the model's own (``model.layers.3.self_attn.q_proj``),
which mlx-lm and transformers share for the Llama family (Llama, Mistral, Qwen, Gemma...).
Arrays go through MLX, which reads and writes bfloat16 as well as float32.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

from mlx_tune.export import ExportError
from mlx_tune.export.fit import check_fits_base
from mlx_tune.files import check_new_dir

MLX_WEIGHTS, PEFT_WEIGHTS, CONFIG = "adapters.safetensors", "adapter_model.safetensors", "adapter_config.json"
SIDECAR = "mlx_tune_adapter.json"  # the torch backend's note on how to rebuild the base
PEFT_PREFIX = "base_model.model."
_LAYER = re.compile(r"^(?P<head>.*?\.)(?P<idx>\d+)\.(?P<tail>.+)$")


@dataclass
class Adapter:
    """Format-neutral: per module path (``model.layers.3.self_attn.q_proj``) the
    A [r, in] and B [out, r] matrices (peft's layout) and, for DoRA, the magnitude."""

    kind: str  # "lora" | "dora"
    rank: int
    scale: float
    dropout: float
    a: dict[str, mx.array]
    b: dict[str, mx.array]
    m: dict[str, mx.array]
    base_model: str | None
    extra: dict  # what mlx-tune's own files say about the base (quantize, dtype)


def detect_format(path: Path) -> str:
    if (path / MLX_WEIGHTS).is_file():
        return "mlx"
    if (path / PEFT_WEIGHTS).is_file():
        return "peft"
    raise ExportError(f"{path}: no {MLX_WEIGHTS} (mlx-lm) or {PEFT_WEIGHTS} (peft) found")


def read_json_object(file: Path) -> dict:
    """A JSON object from ``file``; a missing, unreadable, truncated or non-object file
    is one ExportError naming the file (and line)."""
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ExportError(f"{file}: missing") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"{file}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(config, dict):
        raise ExportError(f"{file}: expected a JSON object")
    return config


def _read_config(path: Path) -> dict:
    return read_json_object(path / CONFIG)


def load_tensors(file: Path) -> dict[str, mx.array]:
    """Every array of a safetensors file; a truncated or corrupt file is one ExportError
    naming it (MLX reads the whole header and checks every offset against the size)."""
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError, OSError) as e:
        raise ExportError(f"{file}: not a readable safetensors file ({e})") from None


def number(config: dict, key: str, where: Path, kind: type = float, default=None):
    """``config[key]`` as ``kind`` (int or float), else one ExportError naming the key."""
    value = config.get(key, default)
    if value is None:
        raise ExportError(f"{where}: key '{key}' missing (expected {kind.__name__})")
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or not math.isfinite(value):
        raise ExportError(f"{where}: key '{key}' is {value!r}; expected "
                          + ("an integer" if kind is int else "a finite number"))
    return kind(value)


def _split(key: str, leaves: dict[str, str], where: Path) -> tuple[str, str]:
    for suffix, name in leaves.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], name
    raise ExportError(f"{where}: tensor {key!r} is not a LoRA/DoRA weight "
                      f"(expected names ending in {', '.join(leaves)})")


def read_mlx(path: Path) -> Adapter:
    config = _read_config(path)
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise ExportError(f"{path / CONFIG}: fine_tune_type is {kind!r}; only lora and dora "
                          "adapters convert (a full fine-tune is a model: use `mlx-tune fuse`)")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "scale" not in params:
        raise ExportError(f"{path / CONFIG}: key 'lora_parameters' with 'rank' and 'scale' expected")
    where = f"{path / CONFIG}: lora_parameters"
    a, b, m = collect(load_tensors(path / MLX_WEIGHTS), "mlx", path / MLX_WEIGHTS)
    rank = _check(a, b, m, kind, path / MLX_WEIGHTS)
    if number(params, "rank", where, int, default=rank) != rank:
        raise ExportError(f"{path / CONFIG}: lora_parameters.rank is {params['rank']} but the "
                          f"weights have rank {rank}")
    extra = {k: config[k] for k in ("quantize", "quantize_group_size", "model") if k in config}
    return Adapter(kind, rank, number(params, "scale", where),
                   number(params, "dropout", where, default=0.0),
                   a, b, m, _name(config, ("base_model", "model"), path / CONFIG), extra)


def _name(config: dict, keys: tuple[str, ...], where: Path) -> str | None:
    """The first of ``keys`` that is set: a model name or path, or None."""
    for key in keys:
        value = config.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ExportError(f"{where}: key '{key}' is {value!r}; expected a model path or id")
        if value:
            return value
    return None


def read_peft(path: Path) -> Adapter:
    config = _read_config(path)
    where = path / CONFIG
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{where}: peft_type is {config.get('peft_type')!r}; only LORA converts")
    for key, empty in (("rank_pattern", {}), ("alpha_pattern", {}), ("modules_to_save", None)):
        if config.get(key) not in (empty, None, {}, []):
            raise ExportError(f"{where}: {key} is set; mlx-lm adapters have one rank and scale "
                              "and no extra trained modules, so this adapter cannot convert exactly")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ExportError(f"{where}: bias is {config.get('bias')!r}; only bias 'none' converts")
    if config.get("fan_in_fan_out"):
        raise ExportError(f"{where}: fan_in_fan_out adapters (GPT-2 Conv1D) do not convert")
    r, alpha = number(config, "r", where, int), number(config, "lora_alpha", where)
    if r < 1:
        raise ExportError(f"{where}: key 'r' is {r}; expected an integer >= 1")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    a, b, m = collect(load_tensors(path / PEFT_WEIGHTS), "peft", path / PEFT_WEIGHTS)
    kind = "dora" if config.get("use_dora") else "lora"
    rank = _check(a, b, m, kind, path / PEFT_WEIGHTS)
    if rank != r:
        raise ExportError(f"{where}: r is {r} but the weights have rank {rank}")
    extra: dict = {}
    if (path / SIDECAR).is_file():
        extra = {k: v for k, v in read_json_object(path / SIDECAR).items()
                 if k in ("quantize", "dtype", "model")}
    return Adapter(kind, rank, scale, number(config, "lora_dropout", where, default=0.0), a, b,
                   m, _name(config, ("base_model_name_or_path",), where), extra)


MLX_LEAVES = {".lora_a": "a", ".lora_b": "b", ".m": "m"}
# peft's files drop the adapter name; live parameters (the torch backend's checkpoints)
# carry it: "...lora_A.default.weight", "...lora_magnitude_vector.default.weight".
PEFT_LEAVES = {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_magnitude_vector": "m",
               ".lora_magnitude_vector.weight": "m", ".lora_A.default.weight": "a",
               ".lora_B.default.weight": "b", ".lora_magnitude_vector.default.weight": "m"}


def collect(tensors: dict[str, mx.array], fmt: str, where: Path | str) -> tuple[dict, dict, dict]:
    """A [r, in], B [out, r] and magnitudes per module path, from either format's names."""
    a: dict[str, mx.array] = {}
    b: dict[str, mx.array] = {}
    m: dict[str, mx.array] = {}
    for key, value in tensors.items():
        module, leaf = _split(key, MLX_LEAVES if fmt == "mlx" else PEFT_LEAVES, Path(where))
        if fmt == "peft" and module.startswith(PEFT_PREFIX):
            module = module[len(PEFT_PREFIX):]
        transpose = fmt == "mlx" and leaf != "m"
        {"a": a, "b": b, "m": m}[leaf][module] = value.T if transpose else value
    return a, b, m


def _check(a: dict, b: dict, m: dict, kind: str, where: Path) -> int:
    flat = [f"{k} has shape {tuple(v.shape)}" for part, ndim in ((a, 2), (b, 2), (m, 1))
            for k, v in part.items() if v.ndim != ndim]
    if flat:
        raise ExportError(f"{where}: {flat[0]}; LoRA A and B are matrices, a magnitude a vector")
    if not a or set(a) != set(b):
        raise ExportError(f"{where}: every adapted module needs both A and B "
                          f"(found A for {len(a)}, B for {len(b)})")
    if (kind == "dora") != bool(m) or (m and set(m) != set(a)):
        raise ExportError(f"{where}: {kind} adapter but magnitude vectors for {len(m)} of "
                          f"{len(a)} modules")
    ranks = {v.shape[0] for v in a.values()} | {v.shape[1] for v in b.values()}
    if len(ranks) != 1:
        raise ExportError(f"{where}: modules have different ranks {sorted(ranks)}")
    return ranks.pop()


def _layer_split(module: str) -> tuple[str, int, str]:
    match = _LAYER.match(module)
    if not match:
        raise ExportError(f"adapted module {module!r} is not inside a numbered block")
    return match["head"], int(match["idx"]), match["tail"]


def local_base(base: str | Path | None) -> Path | None:
    """The base model's directory here: a local path, an alias of mlx-tune's own table
    (the embedded ``tiny-mistral``, or the repo an alias names), or a repo id in the
    Hugging Face cache (never downloaded); None when none of these."""
    if not base:
        return None
    path = Path(base)
    if path.is_dir():
        return path
    from mlx_tune.models.hub import PACKAGE_DIR, load_aliases
    entry = {k.lower(): v for k, v in load_aliases().items()}.get(str(base).lower(), {})
    if "path" in entry and (PACKAGE_DIR / entry["path"]).is_dir():
        return PACKAGE_DIR / entry["path"]
    base = entry.get("repo", base)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(base), local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached or not a repo id: the caller says so
        return None


def num_blocks(base: str | Path | None) -> int | None:
    """The base's number of transformer blocks, from its config.json (local or cached)."""
    path = local_base(base)
    if path is None:
        return None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    config = config.get("text_config", config)
    blocks = config.get("num_hidden_layers") or config.get("n_layer")
    return blocks if isinstance(blocks, int) and not isinstance(blocks, bool) else None


def write_mlx(ad: Adapter, dst: Path, blocks: int | None) -> None:
    """mlx-lm adapts the *last* num_layers blocks: blocks the peft adapter skipped inside
    that range get A = B = 0, which adds nothing (LoRA) or a magnitude left to mlx-lm's
    own init ||W|| over an unchanged norm (DoRA: a factor of exactly one)."""
    heads, tails, present = set(), set(), set()
    for module in ad.a:
        head, idx, tail = _layer_split(module)
        heads.add(head), tails.add(tail), present.add(idx)
    if blocks is None:
        raise ExportError(f"cannot tell how many blocks the base {ad.base_model!r} has (mlx-lm "
                          "counts adapted blocks from the last one): pass --base MODEL_DIR")
    if max(present) >= blocks:
        raise ExportError(f"the adapter touches block {max(present)} but the base has {blocks}")
    head = heads.pop() if len(heads) == 1 else None
    if head is None:
        raise ExportError(f"adapted modules sit under several block lists: {sorted(heads)}")
    weights: dict[str, mx.array] = {}
    for idx in range(min(present), blocks):
        for tail in sorted(tails):
            module = f"{head}{idx}.{tail}"
            like = next(k for k in ad.a if _layer_split(k)[2] == tail)
            a = ad.a.get(module, mx.zeros_like(ad.a[like]))
            b = ad.b.get(module, mx.zeros_like(ad.b[like]))
            weights[f"{module}.lora_a"], weights[f"{module}.lora_b"] = a.T, b.T
            if module in ad.m:
                weights[f"{module}.m"] = ad.m[module]
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / MLX_WEIGHTS), weights, metadata={"format": "mlx"})
    config = {"fine_tune_type": ad.kind, "num_layers": blocks - min(present),
              "lora_parameters": {"rank": ad.rank, "scale": ad.scale, "dropout": ad.dropout,
                                  "keys": sorted(tails)},
              "base_model": ad.base_model, **ad.extra, "converted_by": "mlx-tune convert-adapter"}
    (dst / CONFIG).write_text(json.dumps(config, indent=2))


def write_peft(ad: Adapter) -> tuple[dict, dict]:
    layers = sorted({_layer_split(m)[1] for m in ad.a})
    tails = sorted({_layer_split(m)[2] for m in ad.a})
    weights: dict[str, mx.array] = {}
    for module in sorted(ad.a):
        weights[f"{PEFT_PREFIX}{module}.lora_A.weight"] = ad.a[module]
        weights[f"{PEFT_PREFIX}{module}.lora_B.weight"] = ad.b[module]
        if module in ad.m:
            weights[f"{PEFT_PREFIX}{module}.lora_magnitude_vector"] = ad.m[module]
    # Only the keys that matter; peft fills every other field with its defaults.
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ad.rank,
              "lora_alpha": ad.scale * ad.rank, "lora_dropout": ad.dropout,
              "target_modules": tails, "layers_to_transform": layers, "use_dora": ad.kind == "dora",
              "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": ad.base_model}
    return weights, config


def read_adapter(path: Path) -> Adapter:
    """The adapter in ``path``, either format, every file checked (config keys and types,
    weights readable, A and B for each module, one rank): one ExportError naming the
    file and key, never a raw error from a library."""
    return read_mlx(path) if detect_format(path) == "mlx" else read_peft(path)


def convert_adapter(src: Path | str, dst: Path | str, to: str, base: str | None = None,
                    log: Callable[[str], None] = print) -> Path:
    """Convert the adapter in ``src`` to ``to`` ("mlx" or "peft") in ``dst``, a new or
    empty directory, filled in one rename (never half a conversion, never over another
    adapter)."""
    src, dst = Path(src), Path(dst)
    if to not in ("mlx", "peft"):
        raise ExportError(f"--to must be mlx or peft, got {to!r}")
    if not src.is_dir():
        raise ExportError(f"{src}: not a directory")
    if src.resolve() == dst.resolve():
        raise ExportError("source and destination are the same directory")
    check_new_dir(dst, "convert-adapter")
    ad = read_adapter(src)
    named = base or ad.base_model or ad.extra.get("model")
    base_dir = local_base(named)
    if base_dir is not None:
        check_fits_base(ad.a, ad.b, base_dir, src)
    elif to == "peft":
        log(f"the base model ({named or 'not named'}) is not available here: the adapter's "
            "modules were not checked against it (pass --base MODEL_DIR to check)")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if to == "mlx":
            write_mlx(ad, tmp, num_blocks(base_dir))
        else:
            save_peft(ad, tmp)
        if dst.is_dir():
            dst.rmdir()  # empty, checked above: the rename takes its place
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def save_peft(ad: Adapter, dst: Path) -> None:
    weights, config = write_peft(ad)
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / PEFT_WEIGHTS), weights, metadata={"format": "pt"})
    (dst / CONFIG).write_text(json.dumps(config, indent=2))
    (dst / SIDECAR).write_text(json.dumps({
        "trainer": "mlx-tune", "fine_tune_type": ad.kind, "base_model": ad.base_model,
        "quantize": ad.extra.get("quantize"), "model": ad.extra.get("model")}, indent=2))
