"""What every command that trains does first: spec -> backend -> model -> data.

``setup(spec)`` does everything that can be checked without loading a model (required
fields, the backend, the model's location), so a mistake costs a second; ``load()``
then loads the weights, settles gradient accumulation and opens the data. `train`
decides whether to resume between the two; `lr-find` calls them back to back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import yaml

from mlx_tune.backends.base import Backend, ModelInfo
from mlx_tune.backends.select import make_backend, select_backend
from mlx_tune.config.schema import Spec, SpecError
from mlx_tune.config.spec import require
from mlx_tune.data import DataBundle, load_data
from mlx_tune.data.preflight import check_data
from mlx_tune.distributed.launch import check_world
from mlx_tune.models.hub import resolve_model
from mlx_tune.models.tokenizer import load_tokenizer
from mlx_tune.training.planner import plan_accumulation


@dataclass
class Setup:
    spec: Spec  # with the backend resolved ('auto' -> 'mlx' or 'torch')
    backend: Backend
    model_path: Path
    is_main: bool  # rank 0: the rank that writes files and speaks for the run
    log: Callable[[str], None]  # silent on ranks other than 0
    info: ModelInfo | None = None
    accumulation: int = 1
    data: DataBundle | None = None

    def load(self) -> None:
        """Check the data, load the model, settle gradient accumulation, open the data."""
        spec, log = self.spec, self.log
        # The data is checked with the model's tokenizer before the model itself loads.
        check_data(spec, load_tokenizer(self.model_path, spec.trust_remote_code), log)
        self.info = info = self.backend.load(spec, self.model_path)
        if spec.init_adapter:  # a resumed run then restores its own trainable weights
            try:
                self.backend.load_adapter(Path(spec.init_adapter))
            except (ValueError, OSError) as e:
                raise SpecError(f"init_adapter: {e}") from None
            log(f"init_adapter: starting from the adapter in {spec.init_adapter}")
        self.accumulation = resolve_accumulation(spec, self.model_path,
                                                 self.backend.world_size, log)
        pct = 100.0 * info.trainable_params / max(info.total_params, 1)
        log(f"model {self.model_path} ({info.total_params / 1e6:.2f}M parameters"
            + (f", {info.quantized_bits}-bit" if info.quantized_bits else "")
            + f"); trainable {info.trainable_params / 1e6:.3f}M ({pct:.3f}%) with "
            f"{spec.fine_tune_type}")
        self.data = load_data(spec, self.backend.tokenizer, rank=self.backend.rank,
                              world_size=self.backend.world_size, log=log)


def setup(spec: Spec, log: Callable[[str], None] = print) -> Setup:
    """Checks that need no model, the backend, and the model's local path."""
    require(spec, "model", "data")
    check_init_adapter(spec.init_adapter)
    spec = replace(spec, backend=select_backend(spec.backend))
    backend = make_backend(spec.backend)
    is_main = backend.rank == 0
    if not is_main:  # distributed: rank 0 speaks for the run; the others print only errors
        log = _quiet
    check_world(spec, backend.world_size, spec.backend)
    resolved = resolve_model(spec.model, quantize=spec.quantize, backend=spec.backend,
                             trust_remote_code=spec.trust_remote_code, log=log)
    return Setup(spec, backend, resolved.path, is_main, log)


def check_init_adapter(path: str | None) -> None:
    """A missing init_adapter is one line before anything loads, naming the shipped
    config that trains it when there is one (configs/dpo.yaml starts from the
    quickstart's adapter)."""
    if not path or Path(path).is_dir():
        return
    run_dir = Path(path).parent
    makers = []
    for config in sorted(Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []:
        try:
            found = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(found, dict) and found.get("output_dir") and \
                Path(str(found["output_dir"])) == run_dir:
            makers.append(config)
    hint = (f"run `mlx-tune train --config {makers[0]}` first" if makers else
            f"train it first (a run whose output_dir is {run_dir} writes it)")
    raise SpecError(f"init_adapter: {path} does not exist; {hint}")


def resolve_accumulation(spec: Spec, model_dir: Path, world_size: int,
                         log: Callable[[str], None]) -> int:
    """Micro-batches per step: the spec's number, or 'auto' from the memory planner (for
    ``spec.backend``, already resolved, with ``world_size`` data-parallel ranks)."""
    if spec.gradient_accumulation_steps != "auto":
        return int(spec.gradient_accumulation_steps)
    steps = plan_accumulation(spec, model_dir, spec.backend, world_size)
    log(f"gradient_accumulation_steps: auto -> {steps} (micro-batch {spec.batch_size // steps})")
    return steps


def _quiet(_: str) -> None:
    pass
