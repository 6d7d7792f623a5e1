"""Random-weight models with the dimensions of real 7-8B models and fewer layers.

    python benchmarks/hermes_shape.py --shape hermes --layers 2 --output /tmp/hermes-2l

``hermes``: Hermes-2-Pro-Mistral-7B (hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocab
32032, 32 layers). ``llama3``: Llama-3-8B (the same blocks, vocab 128256, RoPE theta 5e5).
The directory is an mlx-lm / Hugging Face model (config.json, model.safetensors in
bfloat16 as the originals ship, and the embedded tiny model's tokenizer, whose ids all lie
inside either vocabulary): what the memory benchmark trains on. Weights are N(0, 0.02)
(norms 1), drawn by MLX from ``--seed``, so a directory is the same every time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "mlx_tune" / "assets" / "tiny-mistral"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")

BLOCK = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
         "head_dim": 128, "intermediate_size": 14336, "num_hidden_layers": 32}
SHAPES = {
    "hermes": {**BLOCK, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
               "vocab_size": 32032, "rope_theta": 10000.0, "max_position_embeddings": 32768},
    "llama3": {**BLOCK, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
               "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 8192},
}


def config(shape: str, layers: int) -> dict:
    """config.json of ``shape`` with ``layers`` of its blocks."""
    tiny = json.loads((TINY / "config.json").read_text())
    cfg = {k: v for k, v in tiny.items() if k not in ("rope_parameters",)}
    cfg.update(SHAPES[shape], num_hidden_layers=layers, torch_dtype="bfloat16",
               dtype="bfloat16", tie_word_embeddings=False, sliding_window=None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    return cfg


def weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "lm_head.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i),
                       p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return shapes


def write_model(shape: str, layers: int, output: Path, seed: int = 0) -> Path:
    """Write the model directory (replacing nothing: an existing complete one is kept)."""
    output = Path(output)
    cfg = config(shape, layers)
    # config.json is written last: its presence marks a complete directory
    if (output / "config.json").exists() and \
            json.loads((output / "config.json").read_text()) == cfg:
        return output
    output.mkdir(parents=True, exist_ok=True)
    keys = mx.random.split(mx.random.key(seed), len(weight_shapes(cfg)))
    weights = {}
    for n, (name, dims) in enumerate(weight_shapes(cfg).items()):
        if len(dims) == 1:
            weights[name] = mx.ones(dims, dtype=mx.bfloat16)
        else:
            weights[name] = (0.02 * mx.random.normal(dims, key=keys[n])
                             ).astype(mx.bfloat16)
    mx.save_safetensors(str(output / "model.safetensors"), weights, metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (TINY / name).exists():
            shutil.copy(TINY / name, output / name)
    (output / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="hermes")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_model(args.shape, args.layers, args.output, args.seed)
    print(f"{args.shape}, {args.layers} layers: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
