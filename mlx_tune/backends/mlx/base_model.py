"""The base model as training sees it: mlx-lm's loader, quantized on load when asked and
the weights are not quantized already, floating weights cast to the spec's dtype.

Training, fusing and generating all rebuild the base here, so an adapter always meets
the weights it was trained against.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlx_tune.backends.common import framework_dtypes

DTYPES = framework_dtypes(mx)


def load_base(model_dir: Path, *, quantize: int | None = None, group_size: int = 64,
              dtype: str = "auto", trust_remote_code: bool = False
              ) -> tuple[nn.Module, dict, int | None]:
    """(model, config, quantization bits or None) for the base in ``model_dir``."""
    from mlx_lm.utils import load_model, quantize_model

    model, config = load_model(Path(model_dir), trust_remote_code=trust_remote_code)
    bits = (config.get("quantization") or {}).get("bits")
    if quantize and bits is None:
        model, config = quantize_model(model, config, group_size, quantize)
        bits = quantize
    if dtype != "auto":
        # Only unquantized floating weights change; packed ints and scales stay put.
        target = DTYPES[dtype]
        model.update(tree_map(lambda p: p.astype(target)
                              if mx.issubdtype(p.dtype, mx.floating) and p.ndim > 0 else p,
                              model.parameters()))
    return model, config, bits
