"""Packing: rows of several examples under a block-diagonal causal mask compute exactly
the losses and LoRA gradients of the examples run one by one (MLX and torch); plans are
seeded, cover each example once an epoch, resume exactly, and use one shape."""

import numpy as np
import pytest

from mlx_tune.config.schema import SpecError
from mlx_tune.config.spec import build_spec
from mlx_tune.data import load_data
from mlx_tune.data.batch import Batch
from mlx_tune.data.packing import best_fit, pack_rows, segment_positions
from mlx_tune.data.testing import chat, tiny_tokenizer, write_jsonl

PACK = 64


def examples():
    """Very different lengths: three that share a row (40 + 10 + 13 = 63), one that fills a
    row exactly (64) and one truncated to a row (80 -> 64). Prompt tokens are not targets."""
    rng = np.random.default_rng(0)
    out = []
    for n, prompt in ((40, 12), (10, 3), (13, 5), (64, 20), (80, 30)):
        ids = rng.integers(10, 1000, n).tolist()
        mask = [0.0] * prompt + [1.0] * (n - prompt)
        out.append((ids, mask))
    return out


def packed_batch():
    exs = examples()
    rows = best_fit([len(i) for i, _ in exs], range(len(exs)), PACK)
    assert sorted(map(sorted, rows)) == [[0, 1, 2], [3], [4]]
    return pack_rows([[exs[i] for i in row] for row in rows], pad_id=3, pack_length=PACK)


def one_by_one():
    """Each example alone, truncated as packing truncates it."""
    return [Batch(np.array([ids[:PACK]], np.int32), np.array([m[:PACK]], np.float32))
            for ids, m in examples()]


def assert_packed_row_is_the_sum(run) -> None:
    """``run(batch) -> (loss_sum, targets, {name: grad})`` on the packed row equals the
    sums over its examples run one by one."""
    loss, n, g = run(packed_batch())
    alone = [run(b) for b in one_by_one()]
    assert n == sum(a[1] for a in alone)
    assert loss == pytest.approx(sum(a[0] for a in alone), rel=1e-5)
    for k, v in g.items():
        np.testing.assert_allclose(v, sum(a[2][k] for a in alone), rtol=1e-3, atol=1e-4)  # grads are O(1)


def test_pack_rows_layout():
    b = packed_batch()
    assert b.tokens.shape == (3, PACK) and b.segments.max() == 3
    assert segment_positions(np.array([[1, 1, 1, 2, 2, 0]])).tolist() == [[0, 1, 2, 0, 1, 0]]
    # No target at any example's first token: nothing is predicted across a boundary.
    starts = np.argwhere(np.diff(b.segments, axis=1) != 0) + [0, 1]
    assert all(b.mask[r, c] == 0 for r, c in starts)
    assert b.n_targets == sum(int(np.sum(m[1:PACK])) for _, m in examples())


def test_mlx_packed_row_equals_examples_one_by_one(tiny_model):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    from mlx_tune.backends.mlx.backend import MLXBackend
    from mlx_tune.backends.mlx.step import token_loss_sums

    backend = MLXBackend()
    backend.load(build_spec(overrides={"model": str(tiny_model), "lora.dropout": 0.0}),
                 tiny_model)
    model = backend.model
    mx.random.seed(1)  # non-zero LoRA B, so every adapter matrix gets a gradient
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05,
                          model.trainable_parameters()))
    grad = nn.value_and_grad(model, token_loss_sums)

    def run(b):
        args = [mx.array(b.tokens), mx.array(b.mask)]
        if b.segments is not None:
            args.append(mx.array(b.segments))
        (loss, n), g = grad(model, *args)
        return float(loss), float(n), {k: np.array(v) for k, v in tree_flatten(g)}

    assert_packed_row_is_the_sum(run)


def test_torch_packed_row_equals_examples_one_by_one(tiny_model):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from mlx_tune.backends.torch.backend import TorchBackend
    from mlx_tune.backends.torch.step import to_device, token_loss_sums

    backend = TorchBackend()
    backend.load(build_spec(overrides={"model": str(tiny_model), "backend": "torch",
                                       "lora.dropout": 0.0}), tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in backend.params.items():
            p.normal_(0, 0.05)

    def run(b):
        tokens, mask, positions = to_device(b, backend.device)
        loss, n = token_loss_sums(backend.forward, tokens, mask, 0.0, positions)
        grads = torch.autograd.grad(loss, list(backend.params.values()))
        return loss.item(), n.item(), {k: g.numpy() for k, g in zip(backend.params, grads)}

    assert_packed_row_is_the_sum(run)


def spec_for(tmp_path, **over):
    return build_spec(overrides={"data": str(tmp_path), "batch_size": 2, "max_length": 96,
                                 "packing": True, "prefetch": 0, **over})


def test_packed_epochs_are_seeded_complete_one_shape_and_resume_exactly(tmp_path):
    tok = tiny_tokenizer()
    write_jsonl(tmp_path / "train.jsonl",
                [chat(f"item {i}", "pancakes " * (1 + (i * 7) % 23)) for i in range(40)])
    write_jsonl(tmp_path / "valid.jsonl", [chat(f"v {i}", "soup " * i) for i in range(1, 6)])
    quiet = lambda m: None  # noqa: E731
    a = load_data(spec_for(tmp_path), tok, log=quiet)
    n = a.train.steps_per_epoch()
    epoch = [a.train.next_batch() for _ in range(n)]
    assert {b.tokens.shape for b in epoch + a.valid.batches()} == {(2, 96)}
    # every example at most once in the epoch (a shuffled partial batch of rows sits out)
    import re
    seen = [int(m) for b in epoch for row, seg in zip(b.tokens, b.segments)
            for k in range(1, int(seg.max()) + 1)
            for m in re.findall(r"item (\d+)", tok.decode(row[seg == k]))]
    assert len(seen) == len(set(seen)) and len(seen) >= 30
    # seeded: the same plan again; another seed another plan
    b = load_data(spec_for(tmp_path), tok, log=quiet)
    again = [b.train.next_batch() for _ in range(n)]
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(epoch, again))
    c = load_data(spec_for(tmp_path, seed=1), tok, log=quiet)
    assert not all(np.array_equal(x.tokens, c.train.next_batch().tokens) for x in epoch[:1])
    # resume mid-epoch: the next batches are the uninterrupted run's
    d = load_data(spec_for(tmp_path), tok, log=quiet)
    for _ in range(2):
        d.train.next_batch()
    e = load_data(spec_for(tmp_path), tok, log=quiet)
    e.train.load_state_dict(d.train.state_dict())
    for x in epoch[2:] + [a.train.next_batch()]:
        y = e.train.next_batch()
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.segments, y.segments)


def test_packing_with_streaming_is_refused():
    with pytest.raises(SpecError, match="packing"):
        build_spec(overrides={"packing": True, "streaming": True})
