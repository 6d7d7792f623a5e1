"""The morning report: what ``metrics.jsonl`` says about a run, as plain data.

``load_history`` reads the records the reporters wrote (``text.JsonlReporter``; a torn
last line from a kill is skipped); ``summarize`` answers the questions one asks the
morning after: did it finish, why did it stop, how far, how fast, how good, where is the
best checkpoint, and did anything go wrong on the way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mlx_tune.errors import UserError
from mlx_tune.reporting.plots import Panel, Series
from mlx_tune.reporting.text import numbered_metrics


class ReportError(UserError, ValueError):
    """A run directory without a readable metrics.jsonl."""


@dataclass
class History:
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    stops: list[dict] = field(default_factory=list)
    starts: list[dict] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    fuses: list[dict] = field(default_factory=list)
    supervisor: list[dict] = field(default_factory=list)  # restarts, adaptations, cooldowns
    torn_lines: int = 0
    damaged: list[str] = field(default_factory=list)  # "file:line: what is wrong"


@dataclass
class Summary:
    run_dir: str
    status: str  # finished | stopped early | interrupted | failed | killed or still running
    stop_reason: str
    exit_code: int | None
    step: int
    total_steps: int | None
    wall_seconds: float
    sessions: int  # the start plus each resume
    trained_tokens: int
    tokens_per_second: float | None
    first_val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    best_checkpoint: str | None
    checkpoints: list[str]
    warnings: list[str]
    fuses: list[str]
    memory: str | None = None  # peaks of active, cache and resident memory; the first-step check
    supervisor: list[str] = field(default_factory=list)  # one line per supervisor event
    supervisor_counts: dict = field(default_factory=dict)  # event -> how many
    # Each evaluation metric by name: (first, at the best step, last) validation value.
    val_metrics: dict[str, tuple] = field(default_factory=dict)


# What the report reads from each record type, by field: a record whose fields do not
# have these types (hand-edited, or written by something else) is skipped and named,
# never a TypeError in the middle of the report.
INT, NUMBER, TEXT, MAPPING = "an integer", "a number", "text", "a mapping"
REQUIRED = {"train": ("step",), "eval": ("step",), "checkpoint": ("step",),
            "start": ("wall_time",), "stop": (), "message": (), "fuse": (),
            "supervisor": ("event",)}
FIELDS = {"step": INT, "exit_code": INT, "total_steps": INT, "skipped_steps": INT,
          "trained_tokens": NUMBER, "wall_time": NUMBER, "loss": NUMBER, "val_loss": NUMBER,
          "learning_rate": NUMBER, "grad_norm": NUMBER, "tokens_per_second": NUMBER,
          "memory_mb": NUMBER, "peak_memory_mb": NUMBER, "memory_delta_mb": NUMBER,
          "reason": TEXT, "text": TEXT, "level": TEXT, "info": MAPPING,
          "early_stopping": MAPPING, "metrics": MAPPING}


def _fits(value, kind: str) -> bool:
    if kind == TEXT:
        return isinstance(value, str)
    if kind == MAPPING:
        return isinstance(value, dict)
    if isinstance(value, bool) or not isinstance(value, int if kind == INT else (int, float)):
        return False
    return math.isfinite(value)


def damage(record: dict) -> str | None:
    """What is wrong with a record the report would read, or None."""
    for key in REQUIRED[record["type"]]:
        if record.get(key) is None:
            return f"a {record['type']} record without '{key}'"
    for key, kind in FIELDS.items():
        value = record.get(key)
        if value is not None and not _fits(value, kind):
            return f"'{key}' is {value!r:.40}; expected {kind}"
    counter = (record.get("early_stopping") or {}).get("spike_counter")
    if counter is not None and not _fits(counter, INT):
        return f"'early_stopping.spike_counter' is {counter!r:.40}; expected {INT}"
    return None


def load_history(run_dir: Path) -> History:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl (is this a run's output_dir?)")
    h = History()
    kinds = {"train": h.train, "eval": h.evals, "checkpoint": h.checkpoints, "stop": h.stops,
             "start": h.starts, "message": h.messages, "fuse": h.fuses,
             "supervisor": h.supervisor}
    try:
        records, h.torn_lines = numbered_metrics(path)
    except OSError as e:
        raise ReportError(f"{path}: cannot read it ({e.strerror or e})") from None
    for line, record in records:
        if not isinstance(record.get("type"), str) or record["type"] not in kinds:
            continue  # a record type the report does not show
        problem = damage(record)
        if problem is None:
            kinds[record["type"]].append(record)
        else:
            h.damaged.append(f"{path}:{line}: {problem}")
    if not (h.train or h.evals or h.starts):
        first = f" ({h.damaged[0]})" if h.damaged else ""
        raise ReportError(f"{path}: holds no usable training records{first}")
    return h


def _wall_seconds(h: History) -> float:
    """Per session (start record to its last record), so the nights between a kill and
    its resume do not count."""
    events = sorted([(r["wall_time"], r.get("type")) for kind in (
        h.starts, h.train, h.evals, h.checkpoints, h.stops, h.messages) for r in kind
        if isinstance(r.get("wall_time"), (int, float))])
    total, begin, last = 0.0, None, None
    for t, kind in events:
        if kind == "start":
            if begin is not None:
                total += last - begin
            begin = t
        elif begin is None:
            begin = t
        last = t
    return total + (last - begin if begin is not None else 0.0)


def _status(stop: dict | None) -> str:
    if stop is None:
        return "killed or still running"
    reason, code = stop.get("reason") or "", stop.get("exit_code")
    if code == 0 and reason.startswith("finished"):
        return "finished"
    if reason.startswith("early stop"):
        return "stopped early"
    if reason.startswith("interrupted"):
        return "interrupted"
    return "failed"


def _warnings(h: History) -> list[str]:
    out = []
    leaks = [r for r in h.train if r.get("leak_warning")]
    if leaks:
        worst = max(h.train, key=lambda r: r.get("memory_delta_mb") or 0)
        out.append(f"memory growth: suspected leak from step {leaks[0]['step']} "
                   f"(+{worst.get('memory_delta_mb') or 0:.0f} MB over the baseline by step {worst['step']})")
    skipped = max((r.get("skipped_steps") or 0 for r in h.train), default=0)
    if skipped:
        first = next(r["step"] for r in h.train if r.get("skipped_steps"))
        out.append(f"skipped steps: {skipped} non-finite step(s) skipped, the first by step {first}")
    spikes = [r for r in h.train if (r.get("early_stopping") or {}).get("spike_counter")]
    if spikes:
        top = max(spikes, key=lambda r: r["early_stopping"]["spike_counter"])
        out.append(f"gradient spikes: reported at {len(spikes)} report(s), up to "
                   f"{top['early_stopping']['spike_counter']} in a row (step {top['step']})")
    failed = [m for m in h.messages
              if "checkpoint" in (m.get("text") or "") and "failed" in (m.get("text") or "")]
    if failed:
        out.append(f"failed saves: {len(failed)}, the first at step {failed[0].get('step')}")
    for m in h.messages:
        if m not in failed:
            out.append(f"{m.get('level', 'warning')} at step {m.get('step')}: {m.get('text')}")
    if h.torn_lines:
        out.append(f"{h.torn_lines} unreadable line(s) in metrics.jsonl (a kill mid-write)")
    if h.damaged:
        out.append(f"{len(h.damaged)} damaged record(s) skipped, the first {h.damaged[0]}")
    return out


def _memory(h: History) -> str | None:
    """Highest active, cache and resident figures of the reports, the cache bound and
    the first-step check of the last session."""
    def top(key: str) -> float | None:
        values = [r[key] for r in h.train if isinstance(r.get(key), (int, float))]
        return max(values) if values else None

    info = h.starts[-1].get("info", {}) if h.starts else {}
    parts = []
    if (peak := top("peak_memory_mb")) is not None:
        parts.append(f"peak {peak:,.0f} MB active")
    if (cache := top("cache_memory_mb")) is not None:
        limit = info.get("cache_limit_mb")
        parts.append(f"cache up to {cache:,.0f} MB"
                     + (f" (limit {limit:,.0f} MB)" if limit is not None else ""))
    if (resident := top("resident_mb")) is not None:
        parts.append(f"resident up to {resident:,.0f} MB")
    first = info.get("first_step")
    if first:
        parts.append(f"first step at the widest batch {first['peak_mb']:,.0f} MB"
                     + (f" (planned {first['predicted_mb']:,.0f} MB)"
                        if first.get("predicted_mb") else ""))
    return "; ".join(parts) or None


def summarize(run_dir: Path, h: History) -> Summary:
    run_dir = Path(run_dir)
    stop = h.stops[-1] if h.stops else None
    if stop is not None and h.starts and h.starts[-1]["wall_time"] > (stop.get("wall_time") or 0):
        stop = None  # resumed after that stop, and this session has not ended
    last = h.train[-1] if h.train else {}
    step = max([r.get("step", 0) for r in h.train + h.evals + h.checkpoints] or [0])
    best = min(h.evals, key=lambda r: r["val_loss"] if r.get("val_loss") is not None
               else float("inf"), default=None)
    root = run_dir / "checkpoints"
    on_disk = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if root.is_dir() else []
    best_dir = None
    if (root / "best" / "manifest.json").is_file():
        try:
            best_step = json.loads((root / "best" / "manifest.json").read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            best_step = "unknown: its manifest.json is unreadable"
        best_dir = f"{root / 'best'} (step {best_step})"
    if stop is None:
        reason = f"no stop record: the last record is from step {step}"
    else:
        reason = stop.get("reason") or "?"
    return Summary(
        run_dir=str(run_dir), status=_status(stop), stop_reason=reason,
        exit_code=stop.get("exit_code") if stop else None, step=step,
        total_steps=last.get("total_steps") or ((h.starts[-1].get("info") or {}).get(
            "total_steps") if h.starts else None),
        wall_seconds=_wall_seconds(h), sessions=max(len(h.starts), 1),
        trained_tokens=int(last.get("trained_tokens") or 0),
        tokens_per_second=last.get("tokens_per_second"),
        first_val_loss=h.evals[0].get("val_loss") if h.evals else None,
        best_val_loss=best["val_loss"] if best else None,
        best_step=best["step"] if best else None, best_checkpoint=best_dir,
        checkpoints=on_disk, warnings=_warnings(h),
        fuses=[f"{f.get('checkpoint')} (step {f.get('step')}) -> {f.get('output')}" for f in h.fuses],
        memory=_memory(h),
        supervisor=[supervisor_line(r) for r in h.supervisor],
        supervisor_counts={e: sum(r.get("event") == e for r in h.supervisor)
                           for e in ("restart", "adaptation", "cooldown", "gave_up")},
        val_metrics={name: (h.evals[0].get("metrics", {}).get(name),
                            best.get("metrics", {}).get(name) if best else None,
                            h.evals[-1].get("metrics", {}).get(name))
                     for name in metric_names(h.evals)})


def metric_names(records: list[dict]) -> list[str]:
    """Every metric name the records carry, in the order first seen."""
    return list(dict.fromkeys(n for r in records for n in (r.get("metrics") or {})))


def supervisor_line(r: dict) -> str:
    """One supervisor record (supervise/night.py) as a line of the report."""
    event, step = r.get("event"), r.get("step")
    when = "before the first report" if step is None else f"after step {step}"
    if event == "restart":
        return f"restart {r.get('restart')}: {r.get('cause')} {when}"
    if event == "adaptation":
        evidence = str(r.get("evidence") or "")
        evidence = evidence[evidence.find("["):] if "[" in evidence else evidence
        batch, before = r.get("batch_size"), r.get("accumulation_from")
        was = (batch // before if isinstance(batch, int) and isinstance(before, int) and before > 0
               else "?")
        return (f"adaptation: micro-batch {was} -> {r.get('micro_batch')} "
                f"(gradient_accumulation_steps {before} -> "
                f"{r.get('accumulation_to')}) after {r.get('cause')} {when}: {evidence[:90]}")
    return f"{str(event).replace('_', ' ')}: {r.get('reason')}"


def panels(h: History) -> list[Panel]:
    """The report's plots; a panel without data is left out."""
    steps = [r["step"] for r in h.train]

    def col(key: str) -> list:
        return [r.get(key) for r in h.train]

    out = [Panel("loss", "Loss", "loss", [
        Series("train loss", steps, col("loss")),
        Series("validation loss", [r["step"] for r in h.evals],
               [r.get("val_loss") for r in h.evals], "o-")]),
        Panel("lr", "Learning rate", "lr", [Series("learning rate", steps, col("learning_rate"))]),
        Panel("grad_norm", "Gradient norm", "norm", [Series("gradient norm", steps, col("grad_norm"))],
              log_y=True),
        Panel("tokens_per_second", "Throughput", "tokens/s",
              [Series("tokens/s", steps, col("tokens_per_second"))]),
        Panel("memory", "Memory", "MB", [Series("memory", steps, col("memory_mb")),
                                         Series("peak memory", steps, col("peak_memory_mb")),
                                         Series("cache memory", steps, col("cache_memory_mb")),
                                         Series("resident memory", steps, col("resident_mb"))])]
    for name in metric_names(h.train + h.evals):  # one panel per metric, train and validation
        def values(records: list[dict], name: str = name) -> tuple[list, list]:
            kept = [r for r in records if name in (r.get("metrics") or {})]
            return [r["step"] for r in kept], [r["metrics"][name] for r in kept]
        stem = "metric_" + "".join(c if c.isalnum() else "_" for c in name)
        out.append(Panel(stem, name, name, [Series(f"train {name}", *values(h.train)),
                                            Series(f"validation {name}", *values(h.evals), "o-")]))
    return [p for p in out if any(s.steps for s in p.series)]
