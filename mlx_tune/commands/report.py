"""`mlx-tune report RUN_DIR`: the morning report in the terminal, and as a self-contained
HTML page (plots embedded as base64 PNG, also written as files under RUN_DIR/report/)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from mlx_tune.reporting.plots import MissingExtra, render_panel
from mlx_tune.reporting.summary import Summary, load_history, panels, summarize


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def summary_lines(s: Summary) -> list[tuple[str, str]]:
    total = f"/{s.total_steps}" if s.total_steps else ""
    rows = [("status", s.status), ("stopped because", s.stop_reason),
            ("steps", f"{s.step}{total}"),
            ("wall time", f"{_hms(s.wall_seconds)}"
             + (f" over {s.sessions} sessions (resumed)" if s.sessions > 1 else "")),
            ("tokens trained", f"{s.trained_tokens:,}"
             + (f" ({s.tokens_per_second:,.0f} tok/s at the end)" if s.tokens_per_second else ""))]
    if s.best_val_loss is not None:
        rows.append(("best validation loss", f"{s.best_val_loss:.4f} at step {s.best_step}"
                     + (f" (first {s.first_val_loss:.4f})" if s.first_val_loss else "")))
    if s.memory:
        rows.append(("memory", s.memory))
    rows.append(("best checkpoint", s.best_checkpoint or "none"))
    rows.append(("checkpoints", ", ".join(s.checkpoints) or "none"))
    for f in s.fuses:
        rows.append(("fused", f))
    rows.append(("warnings", "none" if not s.warnings else str(len(s.warnings))))
    rows.extend(("  -", w) for w in s.warnings)
    return rows


def render_html(s: Summary, images: dict[str, tuple[str, bytes]], note: str | None) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in summary_lines(s))
    figures = "".join(
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(alt)}</figcaption></figure>'
        for alt, png in images.values())
    extra = f"<p class=note>{html.escape(note)}</p>" if note else ""
    return (f"<!doctype html><html><head><meta charset=utf-8><title>mlx-tune report: "
            f"{html.escape(s.run_dir)}</title><style>body{{font-family:system-ui,sans-serif;"
            "max-width:860px;margin:2em auto}th{text-align:left;padding-right:1em;vertical-align:top}"
            "figure{margin:1.5em 0}.note{color:#a33}</style></head><body>"
            f"<h1>Run report</h1><p>{html.escape(s.run_dir)}</p><table>{rows}</table>{extra}"
            f"{figures}</body></html>\n")


def report_cli(run_dir: Path, html_path: Path | None = None) -> int:
    from rich.console import Console
    from rich.table import Table
    from mlx_tune.files import atomic_write

    history = load_history(run_dir)
    summary = summarize(run_dir, history)
    table = Table(title=f"mlx-tune report: {run_dir}", show_header=False)
    for key, value in summary_lines(summary):
        table.add_row(key, value, style="yellow" if key == "  -" else None)
    console = Console()
    console.print(table)
    images, note = {}, None
    try:
        out_dir = Path(run_dir) / "report"
        for panel in panels(history):
            png = render_panel(panel)
            out_dir.mkdir(exist_ok=True)
            atomic_write(out_dir / f"{panel.name}.png", png)
            images[panel.name] = (", ".join(s.label for s in panel.series), png)
    except MissingExtra as e:
        note = f"no plots: {e}"
        console.print(f"[yellow]{note}[/]")
    html_path = html_path or Path(run_dir) / "report.html"
    atomic_write(html_path, render_html(summary, images, note))
    console.print(f"report written to {html_path}"
                  + (f" (plots in {Path(run_dir) / 'report'})" if images else ""))
    return 0
