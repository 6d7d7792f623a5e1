"""`mlx-tune report RUN_DIR`: the morning report in the terminal, and as a self-contained
HTML page (plots embedded as base64 PNG, also written as files under RUN_DIR/report/)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from mlx_tune.reporting.plots import MissingExtra, render_panel
from mlx_tune.reporting.summary import ReportError, Summary, load_history, panels, summarize


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
    for name, (first, at_best, last) in s.val_metrics.items():
        rows.append((f"validation {name}", " -> ".join(
            "?" if v is None else f"{v:.4g}" for v in (first, last))
            + ("" if at_best is None else f" ({at_best:.4g} at the best step)")))
    if s.memory:
        rows.append(("memory", s.memory))
    rows.append(("best checkpoint", s.best_checkpoint or "none"))
    rows.append(("checkpoints", ", ".join(s.checkpoints) or "none"))
    for f in s.fuses:
        rows.append(("fused", f))
    if s.supervisor:  # --supervise: what the night took (supervise/night.py)
        n = s.supervisor_counts
        rows.append(("supervisor", f"{n['restart']} restart(s), {n['adaptation']} "
                     f"adaptation(s), {n['cooldown']} cooldown(s)"
                     + ("; gave up" if n["gave_up"] else "")))
        rows.extend(("  *", line) for line in s.supervisor)
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


def is_report(head: bytes) -> bool:
    """A page render_html wrote (the only kind of file --html replaces unasked)."""
    return head.startswith(b"<!doctype html>") and b"<title>mlx-tune report: " in head


def report_cli(run_dir: Path, html_path: Path | None = None, force: bool = False) -> int:
    from rich.console import Console
    from rich.table import Table
    from mlx_tune.files import atomic_write, check_replaceable

    html_path = html_path or Path(run_dir) / "report.html"
    try:  # --html NEW_DIR/report.html: the folder is made, as the plots' folder is
        html_path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ReportError(f"--html {html_path}: {html_path.parent} is not a directory") from None
    # Before any work: never over a file that is not an earlier report (data, notes).
    check_replaceable(html_path, is_report, what="mlx-tune report", force=force)
    history = load_history(run_dir)
    summary = summarize(run_dir, history)
    table = Table(title=f"mlx-tune report: {run_dir}", show_header=False)
    for key, value in summary_lines(summary):
        table.add_row(key, value, style="yellow" if key == "  -" else None)
    console = Console()
    console.print(table)
    images, note, saved = {}, None, True
    out_dir = Path(run_dir) / "report"
    try:
        for panel in panels(history):
            try:
                png = render_panel(panel)
            except (ValueError, OverflowError) as e:  # values matplotlib cannot scale
                console.print(f"[yellow]warning: no {panel.name} plot: its values cannot be "
                              f"drawn ({e})[/]")
                continue
            images[panel.name] = (", ".join(s.label for s in panel.series), png)
            if saved:
                saved = _save_plot(out_dir, f"{panel.name}.png", png, console)
    except MissingExtra as e:
        note = f"no plots: {e}"
        console.print(f"[yellow]{note}[/]")
    try:
        atomic_write(html_path, render_html(summary, images, note))
    except OSError as e:
        raise ReportError(f"{html_path}: cannot write the report ({e.strerror or e}); give "
                          "--html PATH somewhere writable") from None
    console.print(f"report written to {html_path}"
                  + (f" (plots in {out_dir})" if images and saved else ""))
    return 0


def _save_plot(out_dir: Path, name: str, png: bytes, console) -> bool:
    """The plot as a file beside the run too; a read-only run directory only loses these
    copies (the page embeds every plot), with a warning."""
    from mlx_tune.files import atomic_write
    try:
        if out_dir.is_symlink():  # planted: the plots would land wherever it points
            raise OSError(f"{out_dir} is a symbolic link, not a folder report made")
        out_dir.mkdir(exist_ok=True)
        atomic_write(out_dir / name, png)
        return True
    except OSError as e:
        console.print(f"[yellow]warning: plots not saved under {out_dir} "
                      f"({e.strerror or e}); they are embedded in the HTML page[/]")
        return False
