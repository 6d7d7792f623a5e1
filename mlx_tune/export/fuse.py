"""`mlx-tune fuse`: a run's adapter merged into its base, saved in Hugging Face format.

The merging is the libraries' own, found through the backend registry: on MLX, mlx-lm's
``fuse()`` of each LoRA/DoRA layer (what ``mlx_lm fuse`` does); on torch, peft's
``merge_and_unload``. The adapter comes
from the run directory: ``final`` is ``adapters/`` as written at the end of training,
``best`` and ``step-N`` are rebuilt from a checkpoint's ``trainable/...`` arrays into
the backend's adapter format first. GGUF goes through mlx-lm's converter, for the
architectures it supports.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mlx_tune.export import ExportError
from mlx_tune.files import check_new_dir
from mlx_tune.export.adapters import Adapter, collect, num_blocks, save_peft, write_mlx
from mlx_tune.reporting.text import append_record_or_warn, read_metrics

GGUF_TYPES = ("llama", "mistral", "mixtral")  # mlx_lm.gguf's supported architectures
RECORD = "fused_from.json"


@dataclass
class FuseResult:
    output: Path
    checkpoint: str  # final | best | step-N
    step: int | None  # the training step the weights come from
    source: str  # the adapter or checkpoint directory
    backend: str
    base_model: str
    gguf: str | None


def run_spec(run_dir: Path):
    from mlx_tune.config.spec import build_spec
    path = run_dir / "spec.yaml"
    if not path.is_file():
        raise ExportError(f"{run_dir}: no spec.yaml; is this a run's output_dir?")
    return build_spec(path)


def _final_step(run_dir: Path) -> int | None:
    try:
        records, _ = read_metrics(run_dir / "metrics.jsonl")
    except OSError:
        return None
    return max((r["step"] for r in records if isinstance(r.get("step"), int)), default=None)


def checkpoint_dir(run_dir: Path, which: str) -> tuple[Path, int | None]:
    """The directory holding the weights ``which`` names, and their step."""
    from mlx_tune.checkpoint.format import read_json
    root = run_dir / "checkpoints"
    steps = sorted(int(p.name[5:]) for p in root.glob("step-*") if p.name[5:].isdigit()) \
        if root.is_dir() else []
    listing = ", ".join(["final", "best"] + [f"step-{s}" for s in steps])
    if which == "final":
        if not (run_dir / "adapters").is_dir():
            raise ExportError(f"{run_dir}: no adapters/ (the run did not finish); choose "
                              f"--checkpoint among: {listing}")
        return run_dir / "adapters", _final_step(run_dir)
    if which == "best":
        path = root / "best"
    elif re.fullmatch(r"step-\d+", which):
        path = root / f"step-{int(which[5:]):07d}"
    else:
        raise ExportError(f"--checkpoint must be final, best or step-N, got {which!r}")
    if not path.is_dir():
        raise ExportError(f"{run_dir}: no checkpoint {which!r}; available: {listing}")
    return path, int(read_json(path / "manifest.json", "manifest.json")["step"])


def adapter_from_checkpoint(path: Path, spec, model_dir: Path, dst: Path) -> Path:
    """The checkpoint's trainable arrays as an adapter in the format of the backend that
    wrote it (read with that backend's own codec)."""
    import mlx.core as mx
    import numpy as np
    from mlx_tune.backends import registry
    from mlx_tune.backends.common import TRAINABLE, with_prefix
    from mlx_tune.checkpoint.manager import CheckpointManager

    entry = registry.get(spec.backend)
    arrays, _ = CheckpointManager(path.parent, entry.make_codec(), log=lambda m: None).load(path)
    # The converter's arrays are MLX's (export/adapters.py); trained adapters are float32.
    trainable = {k: v if isinstance(v, mx.array) else mx.array(np.asarray(v))
                 for k, v in with_prefix(arrays, TRAINABLE).items()}
    if not trainable:
        raise ExportError(f"{path}: the checkpoint holds no trainable/ arrays")
    fmt = entry.adapter_format
    if spec.fine_tune_type == "full":
        if entry.full_saves_model or fmt != "mlx":
            raise ExportError(f"a {spec.backend} full fine-tune is a whole model already: use "
                              "RUN_DIR/adapters, or fuse --checkpoint final")
        dst.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(dst / "adapters.safetensors"), trainable, metadata={"format": "mlx"})
        (dst / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full",
                                                             "num_layers": -1}))
        return dst
    a, b, m = collect(trainable, fmt, path)
    ad = Adapter(spec.fine_tune_type, spec.lora.rank, spec.lora.scale, spec.lora.dropout,
                 a, b, m, spec.model, {"quantize": spec.quantize, "model": str(model_dir)})
    if fmt == "mlx":
        write_mlx(ad, dst, num_blocks(model_dir))
    else:
        save_peft(ad, dst)
    return dst


def check_adapter(adapter: Path, spec, model_dir: Path) -> None:
    """The adapter about to be fused or evaluated, checked before any library loads it:
    its files readable, its modules the base's (one ExportError naming file and key)."""
    from mlx_tune.export.adapters import load_tensors, read_adapter
    from mlx_tune.export.fit import check_fits_base
    if spec.fine_tune_type != "full":
        ad = read_adapter(adapter)
        check_fits_base(ad.a, ad.b, model_dir, adapter, strict=False)
    elif (adapter / "adapters.safetensors").is_file():  # an MLX full fine-tune's weights
        load_tensors(adapter / "adapters.safetensors")


def fuse_run(run_dir: Path, which: str, output: Path, *, dequantize: bool = False,
             gguf: bool = False, log: Callable[[str], None] = print,
             warn: Callable[[str], None] = print) -> FuseResult:
    run_dir, output = Path(run_dir), Path(output)
    check_new_dir(output, "fuse --output")
    spec = run_spec(run_dir)
    source, step = checkpoint_dir(run_dir, which)
    from mlx_tune.models.hub import resolve_model
    model_dir = resolve_model(spec.model, quantize=spec.quantize, backend=spec.backend,
                              trust_remote_code=spec.trust_remote_code, log=log).path
    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if gguf and model_type not in GGUF_TYPES:
        raise ExportError(f"GGUF export supports {', '.join(GGUF_TYPES)} models (mlx-lm's "
                          f"converter); this base is {model_type!r}. The Hugging Face "
                          "output can be converted with llama.cpp's convert_hf_to_gguf.py")
    with tempfile.TemporaryDirectory(prefix="mlx-tune-fuse-") as tmp:
        adapter = source if which == "final" else adapter_from_checkpoint(
            source, spec, Path(model_dir), Path(tmp) / "adapter")
        check_adapter(adapter, spec, Path(model_dir))
        from mlx_tune.backends import registry
        fuse = registry.get(spec.backend).load("fuse")
        fuse(Path(model_dir), adapter, output, spec, dequantize=dequantize or gguf, log=log)
    gguf_path = None
    if gguf:
        from mlx_tune.export.gguf import write_gguf
        gguf_path = str(write_gguf(output))
    result = FuseResult(output, which, step, str(source), spec.backend, spec.model, gguf_path)
    record(run_dir, result, warn)
    return result


def record(run_dir: Path, result: FuseResult, warn: Callable[[str], None]) -> None:
    """Which weights were fused: next to the model, and in the run's metrics.jsonl (so
    ``mlx-tune report`` lists exports with the rest of the run's history)."""
    entry = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    entry["fused_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (result.output / RECORD).write_text(json.dumps(entry, indent=2))
    append_record_or_warn(run_dir / "metrics.jsonl",
                          {"type": "fuse", **entry, "wall_time": time.time()}, warn)
