"""PNG plots with matplotlib (the optional ``[report]`` extra): the morning report's
training curves and lr-find's sweep."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

INSTALL_HINT = "matplotlib is not installed; install the report extra: pip install 'mlx-tune[report]'"


class MissingExtra(RuntimeError):
    """An optional dependency is missing; the message says how to install it."""


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@dataclass
class Series:
    label: str
    steps: list[float]
    values: list[float]
    style: str = "-"  # matplotlib format: "-" line, "o-" markers


@dataclass
class Panel:
    name: str  # file stem: loss, lr, grad_norm, ...
    title: str
    ylabel: str
    series: list[Series]
    log_y: bool = False


def _finite(xs: Sequence[float], ys: Sequence[float]) -> tuple[list, list]:
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def render_panel(panel: Panel, size: tuple[int, int] = (800, 360), dpi: int = 100) -> bytes:
    """One plot as PNG bytes of exactly ``size`` pixels."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    try:
        for s in panel.series:
            xs, ys = _finite(s.steps, s.values)
            if xs:
                ax.plot(xs, ys, s.style, label=s.label, markersize=4, linewidth=1.4)
        if panel.log_y and any(v > 0 for s in panel.series for v in s.values if v):
            ax.set_yscale("log")
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(loc="best")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)  # no bbox_inches: keep the exact size
        return buf.getvalue()
    finally:
        plt.close(fig)


def write_lr_find_png(path: str | Path, lrs: Sequence[float], losses: Sequence[float],
                      smoothed: Sequence[float], mark: int | None = None,
                      width: int = 640, height: int = 400) -> Path:
    """Raw losses (grey points), smoothed (blue), the suggestion (red), log-scale lr."""
    from mlx_tune.files import atomic_write
    plt = pyplot()
    dpi = 100
    fig, ax = plt.subplots(figsize=(width / dpi, height / dpi), dpi=dpi)
    try:
        xs, ys = _finite(lrs, losses)
        ax.plot(xs, ys, ".", color="0.7", label="loss")
        xs, ys = _finite(lrs, smoothed)
        ax.plot(xs, ys, "-", color="#1f5ac8", label="smoothed loss")
        if mark is not None:
            ax.axvline(lrs[mark], color="#dc2828", label=f"suggested {lrs[mark]:.1e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.set_title("lr-find")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        buf = io.BytesIO()
        # The mark lets lr-find replace its own earlier plot and nothing else.
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": "mlx-tune lr-find"})
    finally:
        plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, buf.getvalue())
