#!/usr/bin/env python3
"""Build mlx-tune's embedded tiny model: ``mlx_tune/assets/tiny-mistral``.

Why it exists
-------------
Tests, the quickstart and the benchmarks must run offline, in minutes, on a
laptop CPU.  No hub model is that small *and* knows anything, and a randomly
initialised model cannot show LoRA learning (there is nothing to adapt).  So
the project builds its own: a ~2.9M-parameter Mistral-architecture causal LM
that has been genuinely pre-trained on the recipe domain of
``data/corpus/pretrain.txt`` (see ``scripts/make_dataset.py``).  The corpus is
plain prose and never contains the ChatML markup, so fine-tuning on
``data/recipes`` has a real, quickly learnable signal (format + chat tokens).

How it is built
---------------
1. A byte-level BPE tokenizer (``tokenizers``) is trained on the corpus, with
   special tokens ``<unk> <s> </s> <pad> <|im_start|> <|im_end|>`` at ids 0..5.
2. The model (``mlx_lm.models.llama``, which is what mlx-lm uses for
   ``model_type: mistral``) is initialised from a seeded NumPy generator
   (GPT-2 style: N(0, 0.02), residual projections scaled by 1/sqrt(2L)).
3. It is pre-trained as a plain causal LM with ``mlx.optimizers.AdamW`` on
   packed windows of the corpus (documents separated by ``</s>``), with a fixed
   seed and fixed batch order, on the MLX CPU device.
4. Everything is written in the Hugging Face layout (``config.json``,
   ``model.safetensors`` with ``MistralForCausalLM`` key names, float32,
   ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
   ``chat_template.jinja``, ``generation_config.json``, ``README.md``) plus
   ``SHA256SUMS`` over all of them.

Determinism
-----------
Two builds on the same platform give bit-identical files: all randomness is
seeded, the batch order is fixed, JSON is written with fixed key order, and
the computation runs on the MLX CPU device.  On Linux the script re-executes
itself with OpenBLAS preloaded (MLX's Linux wheel otherwise uses a reference
BLAS that is ~60x slower *and* rounds differently), so the result does not
depend on whether the caller remembered ``LD_PRELOAD``.  Verified: two
builds (one with ``OPENBLAS_NUM_THREADS=1``, one with the default 2 threads,
under different machine load) produce identical SHA256SUMS, so thread count
does not matter.

Floating-point results of the pre-training depend on the BLAS and CPU kernels,
so ``model.safetensors`` is bit-reproducible only on the reference platform
(Linux x86_64, OpenBLAS 0.3.21 pthread, mlx 0.32.4).  Tokenizer and config
files are reproducible everywhere.  ``--check`` reports which files differ and,
for the weights, the largest absolute difference.

Usage::

    python scripts/build_tiny_model.py            # (re)build the asset in place
    python scripts/build_tiny_model.py --check    # rebuild in a temp dir, compare with SHA256SUMS
    python scripts/build_tiny_model.py --out DIR  # build elsewhere
"""

from __future__ import annotations

import os
import sys

_OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def _ensure_openblas() -> None:
    """Re-exec under LD_PRELOAD=OpenBLAS on Linux when it is available.

    Must run before numpy/mlx are imported; the dynamic loader only honours
    LD_PRELOAD at process start.
    """
    if not sys.platform.startswith("linux") or not os.path.exists(_OPENBLAS):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = (_OPENBLAS + " " + env.get("LD_PRELOAD", "")).strip()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    _ensure_openblas()

# The tokenizers trainer is multi-threaded; pin it so merges cannot depend on
# thread scheduling.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "mlx_tune" / "assets" / "tiny-mistral"
DEFAULT_CORPUS = REPO / "data" / "corpus" / "pretrain.txt"

SEED = 1234

# Special tokens, in id order.  Keep <unk>/<s>/</s> at 0/1/2 (the Llama/Mistral
# convention) so code that assumes those ids keeps working.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
UNK, BOS, EOS_DOC, PAD, IM_START, IM_END = range(len(SPECIAL_TOKENS))

# ChatML.  Prefix-consistent (rendering messages[:-1] with
# add_generation_prompt=True is a prefix of rendering messages), which is what
# prompt masking relies on; with tools the way Hermes-2-Pro writes them: the definitions in a system turn of
# their own (before any user system prompt), each call as a JSON object in a <tool_call>
# block of the assistant turn, and consecutive tool results in one `tool` turn of
# <tool_response> blocks. Without tools the rendering is plain ChatML, byte for byte.
TOOLS_PREAMBLE = (
    "You are a function calling AI model. Here are the available tools: <tools>"
)
TOOLS_FORMAT = (
    "\\n</tools>\\nFor each function call return a JSON object within <tool_call></tool_call> "
    "XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-dict>}\\n</tool_call>'
)
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n" + TOOLS_PREAMBLE + "' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '" + TOOLS_FORMAT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined "
    "and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message['content'] %}{{- message['content'] + '\\n' }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}"
    "{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}{%- if not loop.last %}{{- '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' %}"
    "{{- '<|im_start|>tool\\n' }}{%- else %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Architecture.  ~2.9M parameters, 11.6 MB in float32.
# 4 query heads of 64 (not 8 of 32): on MLX's Linux CPU backend attention cost
# is dominated by per-head overhead and exp(), so fewer, wider heads make both
# pre-training and every LoRA step in the test suite markedly cheaper.  Still
# GQA (2 query heads per key-value head).  intermediate_size 512 keeps the
# safetensors file under 12 MB.
ARCH = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)

# Pre-training schedule (~2.5 CPU-minutes on 2 cores with OpenBLAS).  beta2=0.95
# matters a lot at this tiny step count: with Adam's default 0.999 the
# held-out loss after the same budget is ~4.3 instead of ~1.0.
TRAIN = dict(
    seq_len=256,
    batch_size=4,
    steps=250,
    lr=3e-3,
    warmup=20,
    min_lr_ratio=0.1,
    beta2=0.95,
    weight_decay=0.01,
    grad_clip=1.0,
)

README = """\
# tiny-mistral

A ~2.9M-parameter Mistral-architecture causal language model (4 layers,
hidden 256, 4 query / 2 key-value heads, vocab 1024, float32) that ships
inside mlx-tune so tests, the quickstart and the benchmarks run offline in
minutes on a CPU.

It was pre-trained from scratch on `data/corpus/pretrain.txt`, a synthetic
plain-prose corpus of cooking recipes, so it knows the domain's vocabulary,
dishes and cooking times but has never seen chat markup. Fine-tuning it with
LoRA on `data/recipes` (ChatML conversations) therefore shows a clear drop in
validation loss.

It is not useful for anything outside this project.

Files follow the Hugging Face layout (`MistralForCausalLM`, byte-level BPE
`PreTrainedTokenizerFast`, ChatML chat template, `eos_token` = `<|im_end|>`),
so both `mlx_lm.load` and `transformers` load it.

Rebuild (deterministic; about 2-3 minutes on 2 CPU cores):

    python scripts/make_dataset.py           # only if the corpus changed
    python scripts/build_tiny_model.py
    python scripts/build_tiny_model.py --check
"""


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def read_documents(corpus: Path) -> list[str]:
    """Documents are separated by blank lines in the corpus."""
    text = corpus.read_text(encoding="utf-8")
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE: every byte is in the base alphabet, so nothing is ever <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def tokenizer_config() -> dict:
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": ARCH["max_position_embeddings"],
        "padding_side": "right",
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict:
    return {
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def model_config() -> dict:
    """config.json readable by both mlx-lm (rope_theta) and transformers 5 (rope_parameters)."""
    a = ARCH
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": a["vocab_size"],
        "hidden_size": a["hidden_size"],
        "intermediate_size": a["intermediate_size"],
        "num_hidden_layers": a["num_hidden_layers"],
        "num_attention_heads": a["num_attention_heads"],
        "num_key_value_heads": a["num_key_value_heads"],
        "head_dim": a["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": a["max_position_embeddings"],
        "rms_norm_eps": a["rms_norm_eps"],
        "rope_theta": a["rope_theta"],
        "rope_parameters": {"rope_type": "default", "rope_theta": a["rope_theta"]},
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": BOS,
        "eos_token_id": IM_END,
        "pad_token_id": PAD,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def generation_config() -> dict:
    # Stop at the end of an assistant turn, and also at a plain-text document end.
    return {"bos_token_id": BOS, "eos_token_id": [IM_END, EOS_DOC], "pad_token_id": PAD}


def init_weights(model, seed: int) -> None:
    """Seeded GPT-2 style init, drawn with NumPy so it is identical on every platform."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    rng = np.random.default_rng(seed)
    std = 0.02
    resid_std = std / math.sqrt(2 * ARCH["num_hidden_layers"])
    new = []
    # tree_flatten order is the module's attribute order: fixed across runs.
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            arr = np.ones(p.shape, np.float32)
        else:
            s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            arr = (rng.standard_normal(p.shape, dtype=np.float32) * s).astype(np.float32)
        new.append((name, mx.array(arr)))
    model.update(tree_unflatten(new))


def make_batches(ids: np.ndarray, seq_len: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Fixed sequence of (steps, batch, seq_len+1) windows over the token stream.

    Non-overlapping windows, reshuffled each epoch by a seeded generator.
    """
    n_win = (len(ids) - 1) // seq_len
    starts = np.arange(n_win) * seq_len
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(starts).tolist())
    order_arr = np.array(order[: steps * batch_size]).reshape(steps, batch_size)
    idx = order_arr[..., None] + np.arange(seq_len + 1)[None, None, :]
    return ids[idx]


def pretrain(model, ids: np.ndarray, log=print) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    t = TRAIN
    batches = make_batches(ids, t["seq_len"], t["batch_size"], t["steps"], SEED)
    sched = optim.join_schedules(
        [optim.linear_schedule(1e-5, t["lr"], t["warmup"]),
         optim.cosine_decay(t["lr"], t["steps"] - t["warmup"], t["lr"] * t["min_lr_ratio"])],
        [t["warmup"]],
    )
    opt = optim.AdamW(learning_rate=sched, betas=[0.9, t["beta2"]], weight_decay=t["weight_decay"])

    def loss_fn(m, x, y):
        return nn.losses.cross_entropy(m(x), y, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    # Compiling fuses the elementwise work (RMSNorm, SwiGLU, AdamW), which is a
    # large share of the step time on CPU at this size.
    def _step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, t["grad_clip"])
        opt.update(model, grads)
        return loss

    step_fn = mx.compile(_step, inputs=state, outputs=state)

    losses = []
    t0 = time.perf_counter()
    for i in range(t["steps"]):
        b = mx.array(batches[i])
        loss = step_fn(b[:, :-1], b[:, 1:])
        mx.eval(state, loss)
        losses.append(loss.item())
        if (i + 1) % 50 == 0 or i == 0:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"  step {i + 1:4d}/{t['steps']}  loss {recent:.3f}  "
                f"lr {sched(mx.array(i)).item():.2e}  {time.perf_counter() - t0:6.1f}s")
    return {"final_loss": float(np.mean(losses[-50:])), "first_loss": losses[0],
            "seconds": time.perf_counter() - t0,
            "tokens": t["steps"] * t["batch_size"] * t["seq_len"]}


def eval_loss(model, ids: np.ndarray, seq_len: int) -> float:
    import mlx.core as mx
    import mlx.nn as nn

    n = (len(ids) - 1) // seq_len
    x = np.stack([ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])
    tot = 0.0
    for k in range(0, n, 16):
        b = mx.array(x[k:k + 16])
        tot += nn.losses.cross_entropy(model(b[:, :-1]), b[:, 1:], reduction="sum").item()
    return tot / (n * seq_len)


# ---------------------------------------------------------------------------
# Build / check
# ---------------------------------------------------------------------------


def _dump_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sums(out: Path) -> None:
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "SHA256SUMS")
    (out / "SHA256SUMS").write_text("".join(f"{sha256(out / f)}  {f}\n" for f in files), encoding="utf-8")


def read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
    return sums


def build(out: Path, corpus: Path, log=print) -> dict:
    """Build the whole asset directory into ``out`` (created/overwritten). Returns stats."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from safetensors.numpy import save_file

    # CPU on every platform: Metal/GPU kernels round differently.
    mx.set_default_device(mx.cpu)
    mx.random.seed(SEED)
    t_start = time.perf_counter()

    if not corpus.exists():
        raise SystemExit(f"corpus not found: {corpus}\nrun: python scripts/make_dataset.py")
    docs = read_documents(corpus)
    log(f"corpus: {corpus} ({len(docs)} documents)")

    tok = train_tokenizer(docs, ARCH["vocab_size"])
    assert tok.get_vocab_size() == ARCH["vocab_size"], tok.get_vocab_size()
    enc = tok.encode_batch(docs)
    stream: list[int] = []
    for e in enc:
        stream.extend(e.ids)
        stream.append(EOS_DOC)
    ids = np.array(stream, dtype=np.int32)
    chars = sum(len(d) for d in docs)
    log(f"tokenizer: vocab {tok.get_vocab_size()}, {len(ids):,} tokens ({chars / len(ids):.2f} chars/token)")

    # Hold out the last 2% of the stream to report a clean pre-training loss.
    n_val = max(len(ids) // 50, TRAIN["seq_len"] + 1)
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]

    args = llama.ModelArgs.from_dict(model_config())
    model = llama.Model(args)
    init_weights(model, SEED)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"model: {n_params:,} parameters")

    val0 = eval_loss(model, val_ids, TRAIN["seq_len"])
    stats = pretrain(model, train_ids, log=log)
    stats["val_loss_init"] = val0
    stats["val_loss"] = eval_loss(model, val_ids, TRAIN["seq_len"])
    stats["params"] = n_params
    log(f"pretrain: {stats['tokens']:,} tokens in {stats['seconds']:.1f}s, held-out loss "
        f"{val0:.3f} -> {stats['val_loss']:.3f}")

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    weights = {k: np.array(v, copy=True) for k, v in tree_flatten(model.parameters())}
    assert all(w.dtype == np.float32 for w in weights.values())
    save_file(dict(sorted(weights.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors creates it 0600; package data should be readable

    _dump_json(out / "config.json", model_config())
    _dump_json(out / "generation_config.json", generation_config())
    tok.save(str(out / "tokenizer.json"), pretty=True)
    _dump_json(out / "tokenizer_config.json", tokenizer_config())
    _dump_json(out / "special_tokens_map.json", special_tokens_map())
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (out / "README.md").write_text(README, encoding="utf-8")
    write_sums(out)
    stats["build_seconds"] = time.perf_counter() - t_start
    log(f"wrote {out} in {stats['build_seconds']:.1f}s")
    return stats


def check(committed: Path, corpus: Path) -> int:
    """Rebuild into a temp dir and compare against the committed SHA256SUMS."""
    sums_path = committed / "SHA256SUMS"
    if not sums_path.exists():
        print(f"FAIL: {sums_path} does not exist; build the asset first.", file=sys.stderr)
        return 2
    expected = read_sums(sums_path)
    problems = []
    # First: do the committed files still match their own sums?
    for name, digest in expected.items():
        p = committed / name
        if not p.exists():
            problems.append(f"{name}: listed in SHA256SUMS but missing from {committed}")
        elif sha256(p) != digest:
            problems.append(f"{name}: committed file does not match SHA256SUMS (edited by hand?)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tiny-mistral"
        build(out, corpus)
        got = read_sums(out / "SHA256SUMS")
        for name in sorted(set(expected) | set(got)):
            if expected.get(name) != got.get(name):
                new, old = got.get(name, "missing")[:16], expected.get(name, "missing")[:16]
                msg = f"{name}: rebuilt {new} != committed {old}"
                if name == "model.safetensors" and (committed / name).exists():
                    msg += f" (max |diff| {_max_weight_diff(committed / name, out / name):.3g}; "
                    msg += "weights are only bit-reproducible on the reference platform, see docstring)"
                problems.append(msg)
    if problems:
        print("FAIL: tiny-mistral rebuild does not match the committed asset:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"OK: rebuild matches {sums_path} ({len(expected)} files)")
    return 0


def _max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.numpy import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    if wa.keys() != wb.keys():
        return float("inf")
    return max(float(np.max(np.abs(wa[k] - wb[k]))) if wa[k].shape == wb[k].shape else float("inf") for k in wa)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the embedded tiny-mistral model.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output dir (default {DEFAULT_OUT})")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--check", action="store_true",
                    help="rebuild into a temp dir and compare with the SHA256SUMS in --out")
    args = ap.parse_args(argv)
    if args.check:
        return check(args.out, args.corpus)
    build(args.out, args.corpus)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
