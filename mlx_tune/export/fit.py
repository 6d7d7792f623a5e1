"""Does an adapter fit its base model? Checked from the base's safetensors headers (no
weights are read), before an adapter is converted, fused or evaluated, so an adapter for
modules the base does not have is refused by name instead of converting into something
that will not load, or failing inside a library.

The module paths are the model's own (``model.layers.3.self_attn.q_proj``): the base
holds ``<path>.weight``, [out, in] for a float layer; a quantized MLX layer packs its
weight, so only its output size is compared there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mlx_tune.export import ExportError

_BLOCKS = re.compile(r"^(?P<head>.*?\.)\d+\.")  # "model.layers." of model.layers.3.mlp.up_proj


def base_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the headers of the base's safetensors files."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="numpy") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ExportError(f"{file}: not a readable safetensors file ({e})") from None
    return shapes


def check_fits_base(a: dict[str, Any], b: dict[str, Any], model_dir: Path, where: Path | str,
                    *, strict: bool = True) -> None:
    """ExportError unless every module with an A [r, in] in ``a`` and a B [out, r] in
    ``b`` (an ``Adapter``'s, module path -> array) is a layer of the base with those sizes. Not ``strict``: a base that
    names its tensors in another scheme than the adapter's modules (a vision-language
    model's files) is left to the loader, which compares against the live model."""
    shapes = base_shapes(model_dir)
    if not shapes:
        return  # no safetensors here (a .bin checkpoint): the loader will say what it finds
    if not strict:
        heads = tuple({_BLOCKS.match(m)["head"] if _BLOCKS.match(m) else m for m in a})
        if not any(key.startswith(heads) for key in shapes):  # "model.layers." ...
            return
    for module in sorted(a):
        weight = shapes.get(f"{module}.weight")
        if weight is None:
            like = next((k[: -len(".weight")] for k in sorted(shapes)
                         if k.endswith("_proj.weight")), None)
            raise ExportError(f"{where}: adapts {module}, which the base {model_dir} does not "
                              "have" + (f" (its layers look like {like})" if like else "")
                              + "; is this the adapter's base model?")
        out, inp = b[module].shape[0], a[module].shape[1]
        quantized = f"{module}.scales" in shapes
        if weight[0] != out or (not quantized and len(weight) == 2 and weight[1] != inp):
            raise ExportError(f"{where}: {module} is [{out}, {inp}] in the adapter but "
                              f"{list(weight)} in the base {model_dir}; is this the adapter's "
                              "base model?")
