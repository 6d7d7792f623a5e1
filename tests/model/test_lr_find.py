"""lr-find: one real sweep on the tiny model must leave the caller's weights untouched."""

from __future__ import annotations

import numpy as np

from mlx_tune.commands.lr_find import LRFindResult, run_lr_find
from mlx_tune.config.spec import build_spec


def test_real_sweep_restores_the_weights(tiny_model, recipes, tmp_path):
    """A few steps at absurd learning rates on the MLX backend, then the exact arrays."""
    from mlx.utils import tree_flatten

    from mlx_tune.backends.mlx.backend import MLXBackend
    from mlx_tune.data import load_data

    lines = (recipes / "train.jsonl").read_text().splitlines()[:32]  # tokenizing all is slow
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    spec = build_spec(None, {"model": str(tiny_model), "data": str(tmp_path), "batch_size": 2,
                             "max_length": 64, "lora.rank": 4})
    backend = MLXBackend()
    backend.load(spec, tiny_model)
    before = {k: np.array(v) for k, v in tree_flatten(backend.model.parameters())}
    opt_before = {k: np.array(v) for k, v in tree_flatten(backend.optimizer.state)}
    data = load_data(spec, backend.tokenizer, log=lambda m: None)
    during = {}
    restore = backend.load_state_dict

    def spy(arrays, meta):  # the weights the sweep left behind, just before the restore
        during.update({k: np.array(v) for k, v in tree_flatten(backend.model.parameters())})
        restore(arrays, meta)

    backend.load_state_dict = spy
    try:
        result = run_lr_find(spec, backend, data, 1e-4, 10.0, 6, log=lambda m: None)
    finally:
        data.close()
    assert isinstance(result, LRFindResult) and 2 <= len(result.losses) <= 6
    assert any(not np.array_equal(before[k], during[k]) for k in before)  # it did train
    after = {k: np.array(v) for k, v in tree_flatten(backend.model.parameters())}
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    for k, v in tree_flatten(backend.optimizer.state):
        np.testing.assert_array_equal(opt_before[k], np.array(v), err_msg=k)
