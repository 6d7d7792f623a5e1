"""Score a held-out test file at the end of training (``test_at_end`` / ``--test``).

The run's final weights are scored (the adapter just written to ``output_dir/adapters``;
the EMA weights when ``ema.use_for_eval`` is on, as every evaluation does), on every
record of ``test.jsonl`` or the first ``test_batches`` batches. Loss and perplexity are
means over target tokens, exactly like validation, so the numbers are comparable.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mlx_tune.config.schema import Spec
from mlx_tune.data import load_eval_file
from mlx_tune.data.batch import Batch
from mlx_tune.data.hf import find_data, is_dataset
from mlx_tune.data.records import find_test_only


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # not a pytest class, whatever imports it
    step: int
    path: str
    weights: str  # "final", "final (EMA)", or the checkpoint `mlx-tune evaluate` scored
    loss: float
    perplexity: Optional[float]  # sft only: exp(token cross-entropy)
    metrics: dict  # the objective's evaluation metrics by name (accuracy... for sft)
    tokens: int  # the loss's denominator: target tokens (sft) or pairs/examples
    batches: int
    seconds: float

    def line(self) -> str:
        named = "".join(f" | {name} {value:.4g}" for name, value in self.metrics.items())
        ppl = f" | ppl {self.perplexity:.2f}" if self.perplexity is not None else ""
        return (f"test ({self.path}, {self.weights} weights, step {self.step}): "
                f"loss {self.loss:.4f}{ppl}{named} | {self.tokens} counted in {self.batches} "
                "batches")


def find_test_file(spec: Spec):
    """test.jsonl of a data directory (train.jsonl not needed), or a dataset's 'test'
    split; None when absent."""
    if spec.data and not is_dataset(spec.data):
        return find_test_only(spec.data)
    return find_data(spec).test


def score_test(spec: Spec, backend, accumulation: int, step: int,
               data=None, log=print, *, path=None, weights: str = "final",
               attach: Optional[Callable[[Batch], Batch]] = None) -> Optional[TestResult]:
    """Evaluate the backend's current weights on the test file (or ``path``: a JSONL file
    or a dataset split); None when there is none. ``weights`` names what is scored.

    Every rank scores every test batch (the backend sums across ranks, and the mean of
    identical sums is the same): simple, and the test set is small next to training.
    ``attach``: gives each batch its precomputed reference log-probs (training/reference.py).
    """
    path = find_test_file(spec) if path is None else path
    if path is None:
        log(f"test_at_end: no test.jsonl (or 'test' split) in {spec.data}; nothing to score")
        return None
    tic = time.perf_counter()
    batches = load_eval_file(path, spec, backend.tokenizer, log=log,
                             widths=getattr(data, "widths", None))
    if spec.test_batches >= 0:
        batches = batches[:spec.test_batches]
    if attach is not None:
        batches = [attach(b) for b in batches]
    # The training micro-batch shapes, as the loop evaluates: no new compiled traces.
    batches = [m for b in batches
               for m in (b.split(accumulation) if b.size % accumulation == 0 else [b])]
    use_ema = spec.ema.enabled and spec.ema.use_for_eval
    with (backend.ema_weights() if use_ema else nullcontext()):
        result = backend.evaluate(batches)
    loss = result.loss_sum / max(result.tokens, 1.0)
    return TestResult(step=step, path=str(path), weights=f"{weights} (EMA)" if use_ema else weights,
                     loss=loss, perplexity=math.exp(min(loss, 50.0))
                     if spec.objective == "sft" else None,
                     metrics=result.means(), tokens=int(result.tokens),
                     batches=len(batches), seconds=time.perf_counter() - tic)
