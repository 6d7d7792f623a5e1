"""Rich live view of a training run.

Rendering is decoupled from the loop: ``on_train``/``on_eval``/``on_checkpoint`` only
store a reference to the latest plain-Python record (one attribute assignment, atomic
under the GIL). rich's own refresh thread calls ``render()`` at ``refresh_per_second``
and builds the whole view from a snapshot of those references. So the cost to the
training step is O(1) whatever the report interval, and a slow terminal can never stall
the step. Records are never mutated after the loop hands them over, which is what makes
reading them from the refresh thread safe.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from mlx_tune.reporting.text import fmt_dec, fmt_fixed, fmt_int, fmt_lr, one_line, percent
from mlx_tune.reporting.records import EvalReport, NullReporter, TrainReport

LEAK_MARK = "⚠ LEAK?"
SPARK = "▁▂▃▄▅▆▇█"
TREND_WIDTH = 48  # reports shown in the loss trend
# Early stopping's counters (monitors.EarlyStopping.counters) as a reader names them.
COUNTER_LABELS = {"plateau_counter": "plateau", "val_counter": "no val improvement",
                  "spike_counter": "grad spikes", "consecutive_nonfinite": "non-finite in a row"}
_LEVEL_STYLE = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red"}


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def fmt_count(n: float) -> str:
    """1234 -> 1.2K, 3_400_000 -> 3.4M (parameters, tokens)."""
    n = float(n)
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return fmt_int(n)


def _trend(t: float) -> Text:
    if not math.isfinite(t):
        return Text("?", style="yellow")
    if t < 0:
        return Text(f"↓ {t:+.4f}", style="green")  # negative trend = improving
    if t > 0:
        return Text(f"↑ {t:+.4f}", style="red")
    return Text("→ 0", style="dim")


def sparkline(train: list[tuple[int, float]], val: list[tuple[int, float]],
              width: int = TREND_WIDTH) -> tuple[Text, Text, str]:
    """The last ``width`` train losses as block characters, and the validation points
    that fall in the same steps on the same vertical scale (blank where none)."""
    train = [(st, v) for st, v in train[-width:] if math.isfinite(v)]
    if not train:
        return Text(""), Text(""), ""
    first = train[0][0]
    val = [(st, v) for st, v in val if st >= first and math.isfinite(v)]
    values = [v for _, v in train] + [v for _, v in val]
    low, high = min(values), max(values)

    def level(v: float) -> str:
        return SPARK[0 if high == low else round((v - low) / (high - low) * (len(SPARK) - 1))]

    line = Text("".join(level(v) for _, v in train), style="blue")
    cols = [" "] * len(train)
    steps = [st for st, _ in train]
    for st, v in val:  # the column of the first train report at or after the eval step
        col = next((i for i, s in enumerate(steps) if s >= st), len(steps) - 1)
        cols[col] = level(v)
    return line, Text("".join(cols), style="magenta"), f"{fmt_dec(low, 3)}–{fmt_dec(high, 3)}"


def counters_text(counters: dict[str, int]) -> str:
    return " · ".join(f"{COUNTER_LABELS.get(k, k.replace('_', ' '))} {v}"
                      for k, v in counters.items() if k != "skipped_steps") or "-"


@dataclass(frozen=True)
class _Snapshot:
    info: dict
    train: TrainReport | None
    eval: EvalReport | None
    sample: dict | None
    ckpt: tuple[int, str] | None
    stop: tuple[str, int] | None
    started: float | None
    losses: tuple = ()  # (step, train loss) per report, oldest first
    val_losses: tuple = ()  # (step, val loss) per evaluation


class RichDashboard(NullReporter):
    def __init__(self, total_steps: int, refresh_per_second: float = 2, *,
                 console: Console | None = None) -> None:
        self.total_steps = total_steps
        self.refresh_per_second = refresh_per_second
        self.console = console or Console()
        self._live: Live | None = None
        self._closed = False
        # Latest records; written by the loop thread, read by the refresh thread.
        self._info: dict = {}
        self._train: TrainReport | None = None
        self._eval: EvalReport | None = None
        self._sample: dict | None = None
        self._ckpt: tuple[int, str] | None = None
        self._stop: tuple[str, int] | None = None
        self._started: float | None = None
        self._losses: list[tuple[int, float]] = []  # appended by the loop, read by refresh
        self._val_losses: list[tuple[int, float]] = []

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._live is not None or self._closed:
            return
        self._started = self._started or time.monotonic()
        # get_renderable: Live calls it from its refresh thread at the fixed rate.
        self._live = Live(console=self.console, refresh_per_second=self.refresh_per_second,
                          get_renderable=self.render, transient=False)
        self._live.start(refresh=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()  # renders the final frame once more, then restores the terminal

    # ---------------------------------------------------------------- reporter
    def on_start(self, info: dict) -> None:
        self._info = dict(info)
        self._started = time.monotonic()
        self.start()

    def on_train(self, r: TrainReport) -> None:
        self._train = r  # O(1): no formatting here, see module docstring
        self._losses.append((r.step, r.loss))
        if len(self._losses) > 4 * TREND_WIDTH:
            self._losses = self._losses[-TREND_WIDTH:]  # rebinding: readers keep their list
        if self._live is None and not self._closed:  # tolerate a loop that skipped on_start
            self.start()

    def on_eval(self, r: EvalReport) -> None:
        if r.samples:
            self._sample = r.samples[0]
        self._val_losses.append((r.step, r.val_loss))
        self._eval = r

    def on_checkpoint(self, step: int, path: str) -> None:
        self._ckpt = (step, str(path))

    def on_message(self, text: str, level: str = "info") -> None:
        prefix = f"{level}: " if level in ("warning", "error") else ""
        msg = Text(prefix + text, style=_LEVEL_STYLE.get(level, ""))  # Text: no markup parsing
        # While live, this prints above the view; otherwise it is a plain print.
        console = self._live.console if self._live is not None else self.console
        console.print(msg)

    def on_stop(self, reason: str, exit_code: int) -> None:
        self._stop = (reason, exit_code)

    # ---------------------------------------------------------------- rendering
    def snapshot(self) -> _Snapshot:
        return _Snapshot(self._info, self._train, self._eval, self._sample, self._ckpt,
                         self._stop, self._started, tuple(self._losses[-TREND_WIDTH:]),
                         tuple(self._val_losses))

    def render(self) -> RenderableType:
        try:
            return render_dashboard(self.snapshot(), self.total_steps)
        except Exception as exc:  # noqa: BLE001 -- an exception would kill rich's refresh thread
            return Text(f"dashboard render failed: {exc!r}", style="red")


def _header(info: dict) -> Text:
    parts = []
    for key in ("model", "backend"):
        if info.get(key):
            parts.append(str(info[key]))
    if info.get("trainable_params") is not None:
        parts.append(f"{fmt_count(info['trainable_params'])} trainable params")
    if info.get("resume_step"):
        parts.append(f"resumed at step {info['resume_step']}")
    if info.get("output_dir"):
        parts.append(str(info["output_dir"]))
    header = Text(" · ".join(parts), style="dim")
    if info.get("supervisor"):  # restarts and adaptations so far (supervise/night.py)
        header.append("\n" + str(info["supervisor"]), style="yellow")
    return header


def metric_rows(row: Callable[..., None], prefix: str, metrics: dict[str, float]) -> None:
    """The objective's metrics, two to a row, by name."""
    items = [(prefix + name, fmt_dec(value, 4)) for name, value in metrics.items()]
    for i in range(0, len(items), 2):
        row(*items[i], *(items[i + 1] if i + 1 < len(items) else ()))


def render_dashboard(s: _Snapshot, total_steps: int) -> RenderableType:
    """Pure function of a snapshot: everything the live view shows."""
    t, e = s.train, s.eval
    total = t.total_steps if t else total_steps
    step = t.step if t else int(s.info.get("resume_step") or 0)

    bar = Table.grid(expand=True, padding=(0, 1))
    bar.add_column(ratio=1)
    bar.add_column(justify="right", no_wrap=True)
    bar.add_row(ProgressBar(total=max(total, 1), completed=min(step, max(total, 1))),
                Text(f"{percent(step, total)}%  step {step}/{total}", style="bold"))

    grid = Table.grid(padding=(0, 2))
    for _ in range(2):
        grid.add_column(style="cyan", no_wrap=True)
        grid.add_column()

    def row(a: str, av: Any, b: str = "", bv: Any = "") -> None:
        grid.add_row(a, av if isinstance(av, Text) else Text(str(av)),
                     b, bv if isinstance(bv, Text) else Text(str(bv)))

    if t is None:
        row("status", "waiting for the first report…")
    else:
        loss = Text(f"{fmt_fixed(t.loss, 4)}   avg{t.loss_window} {fmt_fixed(t.loss_avg, 4)}  ")
        loss.append_text(_trend(t.loss_trend))
        row("loss", loss, "learning rate", fmt_lr(t.learning_rate))
        row("grad norm", fmt_dec(t.grad_norm, 3), "epoch", t.epoch)
        row("tokens/s", fmt_int(t.tokens_per_second), "steps/s", fmt_dec(t.steps_per_second, 3))
        elapsed = time.monotonic() - s.started if s.started else None
        row("eta", fmt_duration(t.eta_seconds), "elapsed",
            f"{fmt_duration(elapsed)}  ({fmt_count(t.trained_tokens)} tokens)")
        growth = Text(f"{fmt_int(t.memory_delta_mb, signed=True)} MB since baseline")
        if t.leak_warning:
            growth.append(f"  {LEAK_MARK}", style="bold red")
        row("memory", f"{fmt_int(t.memory_mb)} MB  (peak {fmt_int(t.peak_memory_mb)} MB)",
            "growth", growth)
        resident = "?" if t.resident_mb is None else f"{fmt_int(t.resident_mb)} MB"
        limit = s.info.get("cache_limit_mb")
        row("cache", f"{fmt_int(t.cache_memory_mb)} MB"
            + (f"  (limit {fmt_int(limit)} MB)" if limit is not None else ""),
            "resident", resident)
        if s.info.get("wired_limit_mb"):  # macOS (Metal): see backends/mlx/memory.py
            row("wired limit", f"{fmt_int(s.info['wired_limit_mb'])} MB", "memory cap",
                f"{fmt_int(s.info.get('memory_cap_mb') or 0)} MB")
        # on_checkpoint may arrive after the train report of the same step: prefer it.
        ck_step, ck_path = t.step - t.steps_since_checkpoint, t.last_checkpoint
        if s.ckpt and s.ckpt[0] >= ck_step:
            ck_step, ck_path = s.ckpt
        since = max(0, t.step - ck_step)
        ck_text = "none yet" if not ck_path else f"-{since} steps" if since else "just saved"
        row("checkpoint", ck_text,
            "path", Text(one_line(ck_path or "-", 80), overflow="fold"))
        skipped = Text(str(t.skipped_steps), style="yellow" if t.skipped_steps else "")
        row("early stop", counters_text(t.early_stopping), "skipped steps", skipped)
        if t.compiled_shapes:
            over = t.shape_bound and t.compiled_shapes > t.shape_bound
            shapes = Text(f"{t.compiled_shapes}" + (f" of {t.shape_bound}" if t.shape_bound else ""),
                          style="bold red" if over else "")
            row("compiled shapes", shapes)
        metric_rows(row, "", t.metrics)

    trend = None
    if len(s.losses) > 1:  # its own full-width grid: the 4-column one would truncate it
        line, points, scale = sparkline(list(s.losses), list(s.val_losses))
        trend = Table.grid(padding=(0, 2))
        trend.add_column(style="cyan", no_wrap=True)
        trend.add_column(no_wrap=True)
        trend.add_row("loss trend", line + Text(f"  {scale}", style="dim"))
        if points.plain.strip():
            trend.add_row("val points", points)

    if e is not None:
        val = Text(f"{fmt_dec(e.val_loss, 4)}  @ step {e.step}")
        if e.is_best:
            val.append("  ★ best", style="bold green")
        row("val loss", val, "best", f"{fmt_dec(e.best_val_loss, 4)} @ {e.best_step}")
        metric_rows(row, "val ", e.metrics)
        row("eval time", fmt_duration(e.seconds))

    parts: list[RenderableType] = [_header(s.info), bar, grid] + ([trend] if trend else [])
    if s.sample is not None:
        sample = Text("sample ", style="cyan")
        sample.append(one_line(s.sample.get("prompt", ""), 80), style="dim")
        sample.append(" → ")
        sample.append(one_line(s.sample.get("text", ""), 160))
        parts.append(sample)
    subtitle = None
    if s.stop is not None:
        reason, code = s.stop
        subtitle = Text(f"stopped: {reason} (exit {code})", style="green" if code == 0 else "red")
    return Panel(Group(*parts), title="mlx-tune", title_align="left", subtitle=subtitle,
                 subtitle_align="left")
