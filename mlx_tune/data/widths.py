"""The run's fixed set of padded sequence widths: a bounded number of batch shapes.

Why bounded: ``mx.compile`` keeps one trace per distinct input shape, with its Metal
buffers, and never evicts them. Padding every batch to "the next multiple of 32" gives up
to ``max_length / 32`` training widths (64 at 2048), more for evaluation, and long runs on
a Mac have died of Metal's resource limit that way (ml-explore/mlx #4464). So the widths
are chosen once per run from the training data's length histogram (at most MAX_WIDTHS,
``max_length`` always the last), every batch pads to the smallest width that holds it,
and the set is saved in the checkpoint so a resumed run uses the same shapes.

``mode="align32"`` keeps the old behaviour (every multiple of 32) for comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

MAX_WIDTHS = 8
ALIGN = 32
MODES = ("auto", "align32")


def round_up(n: int, align: int) -> int:
    return -(-int(n) // align) * align


@dataclass
class Widths:
    """Mutable on purpose: one object is shared by the training source and validation,
    and a resumed run replaces ``values`` with the checkpoint's before any batch is made."""

    _values: tuple[int, ...]
    max_length: int
    mode: str = "auto"
    origin: str = ""  # for the log: how the widths were chosen
    # Streaming: choosing reads records, which a resume (that restores the checkpoint's
    # widths) must not pay for, so it is deferred to the first use.
    chooser: Optional[Callable[[], "Widths"]] = field(default=None, repr=False)

    @property
    def values(self) -> tuple[int, ...]:
        if self.chooser is not None:
            chosen, self.chooser = self.chooser(), None
            self._values, self.origin = chosen.values, chosen.origin
        return self._values

    def set(self, values: tuple[int, ...], origin: str) -> None:
        self._values, self.origin, self.chooser = tuple(values), origin, None

    def fit(self, longest: int) -> int:
        """The padded width of a batch whose longest row has ``longest`` tokens."""
        if self.mode == "align32":
            return min(self.max_length, round_up(longest, ALIGN))
        for w in self.values:
            if w >= longest:
                return w
        return self.values[-1]  # rows are truncated to max_length, the last width

    @property
    def bound(self) -> int:
        """How many distinct widths batches can have."""
        if self.mode == "align32":
            return round_up(self.max_length, ALIGN) // ALIGN
        return len(self.values)

    def describe(self) -> str:
        if self.mode == "align32":
            return f"bucket widths: every multiple of {ALIGN} up to {self.max_length} (align32)"
        return f"bucket widths {list(self.values)} ({self.origin})"

    def state_dict(self) -> dict:
        return {"mode": self.mode, "values": list(self.values), "max_length": self.max_length}

    def load_state_dict(self, state: dict) -> str | None:
        """Adopt a checkpoint's widths; returns a line to log when they differ."""
        values = tuple(int(v) for v in state.get("values", ()))
        mode = state.get("mode", self.mode)
        if mode == "auto" and not values:
            return None
        if self.chooser is None and values == self._values and mode == self.mode:
            return None
        saved_max = int(state.get("max_length", self.max_length))
        self.mode = mode
        if saved_max != self.max_length and (not values or values[-1] == saved_max):
            # max_length changed on resume (--accept-changes): rows are now cut at the new
            # length, so the widths must end there; the checkpoint's widths below it stay,
            # so batches that fitted before keep their compiled shapes.
            kept = [v for v in values if v < self.max_length][:MAX_WIDTHS - 1]
            self.set(tuple(kept) + (self.max_length,) if mode == "auto" else (),
                     f"re-planned: max_length {saved_max} in the checkpoint, "
                     f"{self.max_length} now")
            return f"resuming with {self.describe()}"
        self.max_length = saved_max
        self.set(values, "restored from the checkpoint")
        return f"resuming with the checkpoint's {self.describe()}"

    @classmethod
    def choose(cls, lengths: Sequence[int], max_length: int, *, mode: str = "auto",
               max_widths: int = MAX_WIDTHS, origin: str = "") -> "Widths":
        if mode == "align32":
            return cls((), max_length, "align32", origin)
        return cls(optimal_widths(lengths, max_length, max_widths), max_length, mode, origin)


def optimal_widths(lengths: Sequence[int], max_length: int,
                   max_widths: int = MAX_WIDTHS) -> tuple[int, ...]:
    """At most ``max_widths`` widths, ``max_length`` last, minimising total padding.

    Each row is counted as padded to the smallest width that holds it (length-sorted
    batches come close to that). Candidates are multiples of a grain (32, coarser for very
    long max_length so the search stays small); an exact dynamic programme over them picks
    the ``max_widths - 1`` cut points below ``max_length``. Empty data gives (max_length,).
    """
    grain = max(ALIGN, round_up(max(1, max_length // 64), ALIGN))
    cands = sorted({min(max_length, round_up(c, grain)) for c in range(grain, max_length + 1,
                                                                       grain)} | {max_length})
    lens = np.minimum(np.asarray(lengths, dtype=np.int64), max_length)
    if lens.size == 0 or max_widths <= 1:
        return (max_length,)
    # count and length sum of the rows that fall in (cands[j-1], cands[j]]
    idx = np.searchsorted(np.asarray(cands), lens, side="left")
    count = np.bincount(idx, minlength=len(cands)).astype(np.float64)
    total = np.bincount(idx, weights=lens, minlength=len(cands))
    ccount, ctotal = np.concatenate([[0], np.cumsum(count)]), np.concatenate([[0], np.cumsum(total)])

    def cost(a: int, b: int) -> float:  # rows in cands (a, b] padded to cands[b]; a=-1: none below
        n = ccount[b + 1] - ccount[a + 1]
        return n * cands[b] - (ctotal[b + 1] - ctotal[a + 1])

    m = len(cands)
    inf = float("inf")
    # best[k][b]: least padding of the rows up to cands[b] with k widths, the top one cands[b]
    best = [[cost(-1, b) for b in range(m)]]
    back: list[list[int]] = [[-1] * m]
    for _k in range(1, max_widths):
        row, brow = [inf] * m, [-1] * m
        prev = best[-1]
        for b in range(m):
            for a in range(b):
                c = prev[a] + cost(a, b)
                if c < row[b]:
                    row[b], brow[b] = c, a
        best.append(row)
        back.append(brow)
    k = min(range(max_widths), key=lambda i: best[i][m - 1])
    out, b = [], m - 1
    while b >= 0 and k >= 0:
        out.append(cands[b])
        b, k = back[k][b], k - 1
    # Drop widths no row uses (other than max_length): they would never be compiled anyway.
    out = sorted(out)
    used = set(np.asarray(out)[np.searchsorted(np.asarray(out), lens, side="left")].tolist())
    return tuple(w for w in out if w in used or w == max_length)
