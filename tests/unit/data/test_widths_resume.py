"""A resume whose max_length changed (accepted with --accept-changes) must cut rows at the
new length, not at the checkpoint's last bucket width: the widths are re-planned and the
log says so."""

from __future__ import annotations

import json

import numpy as np

from mlx_tune.data.batching import pad_batch
from mlx_tune.data.widths import Widths


def saved(values, max_length) -> dict:
    w = Widths(tuple(values), max_length)
    return json.loads(json.dumps(w.state_dict()))


def test_raised_max_length_keeps_the_old_widths_and_ends_at_the_new_one():
    now = Widths.choose([30] * 4, 512)
    line = now.load_state_dict(saved((64, 128, 256), 256))
    assert now.values == (64, 128, 256, 512)
    assert "re-planned" in line and "256" in line and "512" in line
    row = (np.arange(400, dtype=np.int32), np.ones(400, dtype=np.float32))
    batch = pad_batch([row], 0, 512, now)
    assert batch.tokens.shape[1] == 512 and batch.mask.sum() == 400  # nothing cut


def test_lowered_max_length_drops_the_wider_widths():
    now = Widths.choose([30] * 4, 128)
    now.load_state_dict(saved((64, 128, 256), 256))
    assert now.values == (64, 128) and now.fit(200) == 128


def test_unchanged_max_length_restores_the_checkpoint_widths_exactly():
    now = Widths.choose([250] * 4, 256)
    line = now.load_state_dict(saved((64, 96, 256), 256))
    assert now.values == (64, 96, 256) and "restored" in line
