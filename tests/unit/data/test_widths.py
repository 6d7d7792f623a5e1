"""Bounded compiled shapes: the padding widths chosen for the lengths of the data (against
a brute-force search) and their checkpoint round trip. Whole epochs that compile at most 8
shapes: tests/model/test_shapes.py."""

import json
import numpy as np

from mlx_tune.data.widths import Widths, optimal_widths


def test_optimal_widths_against_brute_force():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 300, 200)
    got = optimal_widths(lengths, 320, max_widths=3)

    def padding(ws):
        ws = np.asarray(sorted(ws))
        return int((ws[np.searchsorted(ws, lengths)] - lengths).sum())

    cands = list(range(32, 321, 32))
    best = min(padding((a, b, 320)) for a in cands for b in cands if a < b < 320)
    assert got[-1] == 320 and len(got) <= 3 and padding(got) == best
    assert optimal_widths([], 512) == (512,) and optimal_widths([40] * 9, 512) == (64, 512)


def test_widths_checkpoint_round_trip():
    a = Widths.choose([10, 100, 200], 256)
    b = Widths.choose([250] * 5, 256)
    assert b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.values == a.values and b.fit(90) == a.fit(90)
