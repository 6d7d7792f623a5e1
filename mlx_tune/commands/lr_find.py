"""`mlx-tune lr-find`: an exponential learning-rate sweep and a suggestion.

The sweep trains for ``steps`` optimizer steps on the real training data with the
spec's model, adapter and optimizer, raising the learning rate geometrically from
``start_lr`` to ``end_lr``, and stops once the loss diverges. It runs on the live
backend, so the trainable weights, optimizer state and RNG are snapshotted first and
restored afterwards: the caller's model is exactly as it was.

The suggestion is the learning rate of the *steepest descent* of the smoothed loss
curve (fastai's "steep" rule): losses are smoothed with an exponential moving average
(beta 0.98, bias-corrected, so the first points are not pulled towards 0), the
gradient of the smoothed loss is taken w.r.t. log10(lr) (a central difference over 5%
of the sweep, see ``suggest_lr``), and the most negative one before the divergence wins. That lr is where training makes the fastest progress per
step; lower is safer, higher is near the cliff.

The PNG is drawn by matplotlib (the optional ``[report]`` extra); without it the sweep
still prints its text plot and writes the CSV, and says how to install the extra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mlx_tune.checkpoint.rundir import RunLock
from mlx_tune.config.schema import Spec, SpecError
from mlx_tune.files import atomic_write, check_replaceable
from mlx_tune.exit_codes import EXIT_ERROR, EXIT_OK
from mlx_tune.reporting.plots import MissingExtra, write_lr_find_png

BETA = 0.98
DIVERGENCE_FACTOR = 4.0


@dataclass
class LRFindResult:
    lrs: list[float]  # the learning rates actually run (the sweep may stop early)
    losses: list[float]  # loss of each step, before its update
    smoothed: list[float]  # bias-corrected EMA of losses
    suggestion: float | None  # lr at the steepest descent (None: no descent, too few points)
    suggestion_index: int | None
    stop_reason: str  # "completed", "diverged" or "non-finite loss"
    min_loss_lr: float | None = None  # lr at the lowest smoothed loss before the stop


# -- the pure parts ---------------------------------------------------------------

def sweep_lrs(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """lr_i = start * (end/start)^(i/(steps-1)): evenly spaced in log(lr)."""
    if steps < 2:
        return [start_lr] * steps
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: Sequence[float], beta: float = BETA) -> list[float]:
    """Exponential moving average with bias correction (divide by 1 - beta^(i+1))."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def is_diverged(smoothed_loss: float, best_smoothed: float,
                factor: float = DIVERGENCE_FACTOR) -> bool:
    """Non-finite, or the smoothed loss has grown past factor x the best seen."""
    return not math.isfinite(smoothed_loss) or smoothed_loss > factor * best_smoothed


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float], skip_start: int | None = None,
               window: int | None = None) -> int | None:
    """Index of the steepest descent of ``smoothed`` w.r.t. log10(lr), or None.

    The caller passes only the points before divergence. The slope at i is the central
    difference over i +- ``window`` points (default: 5% of the sweep; one-sided at the
    ends): adjacent-point differences would crown a single noisy batch, while a wider
    stencil measures sustained descent. The last point is excluded (its slope reaches
    into the divergence), and so are the first ``skip_start`` (default: a tenth of the
    sweep), where the bias-corrected average is still the mean of a handful of batches.
    """
    n = len(lrs)
    skip = n // 10 if skip_start is None else skip_start
    if n < 3 or n - 1 - skip < 1:
        return None
    k = max(1, n // 20) if window is None else window
    x = np.log10(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(smoothed, dtype=np.float64)
    i = np.arange(n)
    lo, hi = np.maximum(i - k, 0), np.minimum(i + k, n - 1)
    slope = ((y[hi] - y[lo]) / (x[hi] - x[lo]))[skip:-1]
    slope = np.where(np.isfinite(slope), slope, np.inf)
    if slope.min() >= 0:
        return None  # the loss never went down: no useful suggestion
    return skip + int(np.argmin(slope))


def _y_range(values: Sequence[float]) -> tuple[float, float]:
    """Loss axis: from the minimum to a bit above the start, so a final spike does not
    flatten the interesting part of the curve into one row."""
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    low = min(finite)
    high = min(max(finite), finite[0] + 0.5 * (finite[0] - low)) if finite[0] > low else max(finite)
    return low, high if high > low else low + 1.0


def text_plot(lrs: Sequence[float], losses: Sequence[float], mark: int | None = None,
              width: int = 60, height: int = 10) -> str:
    """Loss (the CLI passes the smoothed curve) vs log10(lr) in a few rows of characters;
    a "v" above the plot marks the suggestion."""
    if not lrs:
        return "(no points)"
    low, high = _y_range(losses)
    x0, x1 = math.log10(lrs[0]), math.log10(lrs[-1])
    grid = [[" "] * width for _ in range(height)]
    col = lambda lr: 0 if x1 == x0 else round((math.log10(lr) - x0) / (x1 - x0) * (width - 1))
    for lr, loss in zip(lrs, losses):
        if math.isfinite(loss):
            frac = (min(max(loss, low), high) - low) / (high - low)
            grid[height - 1 - round(frac * (height - 1))][col(lr)] = "*"
    top = [" "] * width
    if mark is not None:
        top[col(lrs[mark])] = "v"
    rows = [f"{'':>9} " + "".join(top)]
    for r, row in enumerate(grid):
        label = f"{high:9.3f}" if r == 0 else f"{low:9.3f}" if r == height - 1 else ""
        rows.append(f"{label:>9}|" + "".join(row))
    rows.append(f"{'':>9}+" + "-" * width)
    left, right = f"{lrs[0]:.0e}", f"{lrs[-1]:.0e}"
    rows.append(f"{'':>10}{left}{'log10 lr':^{width - len(left) - len(right)}}{right}")
    return "\n".join(rows)


# Marks lr-find's own outputs, the only files --plot replaces unasked.
PNG_MARK = b"mlx-tune lr-find"  # the PNG's "Software" text chunk (reporting/plots.py)
CSV_HEADER = "lr,loss,smoothed_loss\n"


def _is_ours(head: bytes) -> bool:
    return head.startswith(CSV_HEADER.encode()) or (
        head.startswith(b"\x89PNG\r\n\x1a\n") and PNG_MARK in head)


def check_plot_target(path: str | Path, force: bool = False) -> Path:
    """Refuse (WriteRefused) to write the plot or its .csv over a file lr-find did not
    write, unless ``force``; checked before the model loads, so a refusal costs nothing."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SpecError(f"lr-find: --plot {path} must name a .png file")
    for target in (path, path.with_suffix(".csv")):
        check_replaceable(target, _is_ours, what="lr-find", force=force)
    return path


# -- the driver ---------------------------------------------------------------------

def _copy(value: Any) -> Any:
    """A snapshot that later steps cannot change. torch optimizers update tensors in
    place, so those are cloned; MLX arrays are immutable (an update makes new arrays),
    so holding a reference is already a copy and costs nothing."""
    if hasattr(value, "detach") and hasattr(value, "clone"):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


def run_lr_find(spec: Spec, backend: Any, data: Any, start_lr: float, end_lr: float,
                steps: int, *, accumulation: int = 1,
                log: Callable[[str], None] = print) -> LRFindResult:
    """Sweep on the live backend, then restore its trainable weights and optimizer state."""
    arrays, meta = backend.state_dict()
    snapshot = {k: _copy(v) for k, v in arrays.items()}
    lrs, losses, smoothed = sweep_lrs(start_lr, end_lr, steps), [], []
    reason, best = "completed", math.inf
    try:
        for i, lr in enumerate(lrs):
            batch = data.train.next_batch()
            result = backend.step(batch.split(accumulation), lr, 0.0)
            # One sync per step: the divergence test needs the number now.
            (loss,) = backend.to_floats([result.loss])
            losses.append(loss)
            smoothed = smooth(losses)
            if not math.isfinite(loss):
                reason = "non-finite loss"
                break
            if i > 0 and is_diverged(smoothed[-1], best):
                reason = "diverged"
                break
            best = min(best, smoothed[-1])
            if (i + 1) % max(steps // 10, 1) == 0:
                log(f"lr-find: step {i + 1}/{steps}  lr {lr:.2e}  loss {loss:.4f}")
    finally:
        backend.load_state_dict(snapshot, meta)
    # The points before the one that triggered the stop are the usable curve.
    usable = len(losses) - (reason != "completed")
    index = suggest_lr(lrs[:usable], smoothed[:usable])
    finite = [(v, lr) for v, lr in zip(smoothed[:usable], lrs) if math.isfinite(v)]
    return LRFindResult(lrs=lrs[:len(losses)], losses=losses, smoothed=smoothed,
                        suggestion=lrs[index] if index is not None else None,
                        suggestion_index=index, stop_reason=reason,
                        min_loss_lr=min(finite)[1] if finite else None)


def lr_find_cli(spec: Spec, args: Any) -> int:
    """`mlx-tune lr-find`: load the model and data as `train` would, sweep, report."""
    from mlx_tune.training.reference import sweep_reference, uses_precomputed
    from mlx_tune.training.setup import setup

    start, end, steps = args.start_lr, args.end_lr, args.steps
    if not (math.isfinite(start) and math.isfinite(end) and 0 < start < end):
        raise SpecError(f"lr-find: need 0 < --start-lr < --end-lr, got {start:g} and {end:g}")
    if steps < 3:
        raise SpecError(f"lr-find: --steps must be at least 3, got {steps}")
    plot = check_plot_target(args.plot or Path(spec.output_dir) / "lr_find.png",
                             getattr(args, "force", False))
    run = setup(spec)
    # The sweep writes into output_dir like a run does: one process at a time holds it
    # (a second lr-find, or a train, is refused with exit 9 before any model loads).
    lock = RunLock(spec.output_dir).acquire() if run.is_main else None
    try:
        run.load()
        spec, backend, data = run.spec, run.backend, run.data
        try:
            if uses_precomputed(spec):  # the reference is the model before the sweep
                data = sweep_reference(backend, data, steps, run.accumulation)
            result = run_lr_find(spec, backend, data, start, end, steps,
                                 accumulation=run.accumulation)
        finally:
            data.close()
        return _report(result, plot, args)
    finally:
        if lock is not None:
            lock.release()


def _report(result: LRFindResult, plot: Path, args: Any) -> int:
    """Print the plot and the suggestion; write the PNG and the CSV beside it."""
    print(text_plot(result.lrs, result.smoothed, result.suggestion_index))
    png = plot
    table = png.with_suffix(".csv")  # the numbers behind the plot, for other tools
    table.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(table, CSV_HEADER + "".join(
        f"{lr:.6e},{loss:.6f},{sm:.6f}\n"
        for lr, loss, sm in zip(result.lrs, result.losses, result.smoothed)))
    try:
        write_lr_find_png(png, result.lrs, result.losses, result.smoothed,
                          result.suggestion_index)
        where = f"plot written to {png} (values in {table.name})"
    except MissingExtra as e:
        where = f"values written to {table} (no plot: {e})"
    print(f"lr-find: {len(result.losses)} steps ({result.stop_reason}); {where}")
    if result.suggestion is None:
        print("lr-find: no suggestion: the loss did not decrease; widen the range "
              "(--start-lr/--end-lr) or use more --steps")
        return EXIT_ERROR
    config = f" --config {args.config}" if getattr(args, "config", None) else ""
    print(f"suggested learning rate: {result.suggestion:.2e} (steepest descent of the "
          "smoothed loss)")
    if result.min_loss_lr:  # fastai's other rule of thumb: a decade below the minimum
        print(f"conservative alternative: {result.min_loss_lr / 10:.2e} (the smoothed loss "
              f"is lowest at {result.min_loss_lr:.2e}; a tenth of that)")
    print(f"use it:  mlx-tune train{config} --learning-rate {result.suggestion:.2e}"
          "  (plus the other flags given here)")
    return EXIT_OK
