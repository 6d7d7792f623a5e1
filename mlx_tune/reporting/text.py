"""Text reporters: one plain line per report, and the append-only ``metrics.jsonl``.

Plain line format (``format_train_line``), fields always in this order:

    step 900/2000 45% | loss=3.2 | loss_avg=3.4 | lr=1.8e-4 | tok/s=1510 | eta_h=6.5 | ckpt=-150 | mem_mb=14051 | cache_mb=512 | rss_mb=15220 | mem_delta=+245

- percent: floor(100 * step / total_steps)
- loss, loss_avg: 4 decimals, trailing zeros dropped but one kept (3.2, 3.0, 2.8471)
- lr: ``%.1e`` with the exponent's leading zeros dropped (1.8e-4, 2.0e+0)
- tok/s, mem_mb (active), cache_mb (the allocator's cache), rss_mb (the process's resident
  set; left out where the OS does not say): rounded integers; eta_h: hours with one
  decimal, ``?`` while unknown
- ckpt: steps since the last checkpoint as a negative number (``ckpt=0`` right after one)
- mem_delta: signed integer MB (growth of the footprint since its baseline, taken after
  ``memory.growth_warmup`` steps)
- non-finite numbers print as nan / inf / -inf
- `` | name=value`` for each of the objective's metrics (4 decimals), in its order
- `` | shapes=N/B``: distinct input shapes the compiled step has seen / the run's bound
  (``shapes=N/B OVER`` past it: each shape is a compiled trace a long run keeps)
- suffixes appear only when they carry news: `` | skipped=N`` once steps were skipped,
  `` | LEAK?`` while the memory monitor suspects a leak.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, TextIO

from mlx_tune.files import WriteRefused, atomic_write, open_append
from mlx_tune.reporting.records import LEVELS, EvalReport, NullReporter, TrainReport


# ------------------------------------------------------------------ formatting
def _nonfinite(x: float) -> str | None:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return None


def fmt_dec(x: float, places: int) -> str:
    """Up to ``places`` decimals, trailing zeros dropped, at least one decimal kept."""
    x = float(x)
    bad = _nonfinite(x)
    if bad:
        return bad
    s = f"{x:.{places}f}"
    if "." in s:
        s = s.rstrip("0")
        if s.endswith("."):
            s += "0"
    return s


def fmt_lr(x: float) -> str:
    """``%.1e`` without the exponent's leading zeros: 1.8e-04 -> 1.8e-4."""
    x = float(x)
    bad = _nonfinite(x)
    if bad:
        return bad
    mantissa, exp = f"{x:.1e}".split("e")
    return f"{mantissa}e{exp[0]}{exp[1:].lstrip('0') or '0'}"


def fmt_int(x: float, signed: bool = False) -> str:
    x = float(x)
    bad = _nonfinite(x)
    if bad:
        return bad
    return f"{round(x):+d}" if signed else f"{round(x):d}"


def fmt_fixed(x: float, places: int) -> str:
    x = float(x)
    return _nonfinite(x) or f"{x:.{places}f}"


def percent(step: int, total: int) -> int:
    return max(0, min(100, step * 100 // total)) if total > 0 else 0


def one_line(text: str, limit: int) -> str:
    """Newlines made visible and the text cut to ``limit`` characters."""
    s = str(text).replace("\r", "").replace("\n", "\\n")
    return s if len(s) <= limit else s[: max(0, limit - 1)] + "…"


def format_train_line(r: TrainReport) -> str:
    eta = "?" if r.eta_seconds is None else fmt_fixed(r.eta_seconds / 3600.0, 1)
    ckpt = f"-{r.steps_since_checkpoint}" if r.steps_since_checkpoint > 0 else "0"
    line = (
        f"step {r.step}/{r.total_steps} {percent(r.step, r.total_steps)}%"
        f" | loss={fmt_dec(r.loss, 4)} | loss_avg={fmt_dec(r.loss_avg, 4)}"
        f" | lr={fmt_lr(r.learning_rate)} | tok/s={fmt_int(r.tokens_per_second)}"
        f" | eta_h={eta} | ckpt={ckpt}"
        f" | mem_mb={fmt_int(r.memory_mb)} | cache_mb={fmt_int(r.cache_memory_mb)}"
        + ("" if r.resident_mb is None else f" | rss_mb={fmt_int(r.resident_mb)}")
        + f" | mem_delta={fmt_int(r.memory_delta_mb, signed=True)}"
    )
    line += named_metrics(r.metrics)
    if r.compiled_shapes:
        line += f" | shapes={r.compiled_shapes}"
        if r.shape_bound:
            line += f"/{r.shape_bound}" + (" OVER" if r.compiled_shapes > r.shape_bound else "")
    if r.skipped_steps:
        line += f" | skipped={r.skipped_steps}"
    if r.leak_warning:
        line += " | LEAK?"
    return line


def named_metrics(metrics: dict[str, float]) -> str:
    """`` | name=value`` for each metric, in the order the objective gives them."""
    return "".join(f" | {name}={fmt_dec(value, 4)}" for name, value in metrics.items())


def format_eval_line(r: EvalReport) -> str:
    return (f"eval step {r.step} | val_loss={fmt_dec(r.val_loss, 4)}{named_metrics(r.metrics)}"
            f" | best={fmt_dec(r.best_val_loss, 4)}@{r.best_step}")


def format_sample_line(i: int, sample: dict, limit: int = 300) -> str:
    return (
        f"sample {i} | prompt={one_line(sample.get('prompt', ''), 120)}"
        f" | text={one_line(sample.get('text', ''), limit)}"
    )


def format_stop_line(reason: str, exit_code: int) -> str:
    return f"stop | reason={reason} | exit_code={exit_code}"


def _level_rank(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else LEVELS.index("info")


# ------------------------------------------------------------------ plain
class PlainReporter(NullReporter):
    """One line per event, flushed, for log files and non-terminals.

    ``stream=None`` means "sys.stdout at the time of writing" (so redirection and test
    capture work). ``min_level="error"`` is what non-main ranks use: only error messages.
    Report lines count as level "info".
    """

    def __init__(self, stream: TextIO | None = None, *, min_level: str = "info") -> None:
        self._stream = stream
        self._min = _level_rank(min_level)

    def _write(self, line: str, level: str = "info") -> None:
        if _level_rank(level) < self._min:
            return
        stream = self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()  # tail -f on a log file must see every line as it happens

    def on_start(self, info: dict) -> None:
        self._write("start | " + " | ".join(f"{k}={v}" for k, v in info.items()))

    def on_train(self, r: TrainReport) -> None:
        self._write(format_train_line(r))

    def on_eval(self, r: EvalReport) -> None:
        self._write(format_eval_line(r))
        for i, sample in enumerate(r.samples):
            self._write(format_sample_line(i, sample))

    def on_checkpoint(self, step: int, path: str) -> None:
        self._write(f"checkpoint step {step} | {path}")

    def on_message(self, text: str, level: str = "info") -> None:
        prefix = f"{level}: " if level in ("warning", "error") else ""
        self._write(prefix + text, level)

    def on_stop(self, reason: str, exit_code: int) -> None:
        self._write(format_stop_line(reason, exit_code))


# ------------------------------------------------------------------ jsonl
def json_safe(x: Any) -> Any:
    # Strict JSON has no NaN/Infinity (jq, browsers and many loaders reject them): a
    # non-finite loss becomes null, which the "skipped_steps"/stop records explain.
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _parse_complete(raw: bytes) -> dict | None:
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def numbered_metrics(path: Path) -> tuple[list[tuple[int, dict]], int]:
    """The complete records of a metrics.jsonl with their 1-based line numbers, and how
    many lines were unreadable (a torn line from a run killed mid-write is skipped, never
    fatal)."""
    records, torn = [], 0
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        rec = _parse_complete(raw)
        if rec is None:
            torn += bool(raw.strip())
        else:
            records.append((number, rec))
    return records, torn


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The complete records of a metrics.jsonl, and how many lines were unreadable."""
    numbered, torn = numbered_metrics(path)
    return [rec for _, rec in numbered], torn


def append_record(path: Path, record: dict) -> None:
    """One line appended to metrics.jsonl in one write, by a command run after training
    (evaluate, fuse). A torn last line (a run killed mid-write) is ended first, so it stays
    one unreadable line that readers skip, rather than swallowing this record; the file is
    never rewritten."""
    line = json.dumps(json_safe(record), default=str, allow_nan=False) + "\n"
    with open_append(path) as out:  # a regular file from here on: reading it cannot block
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            if fh.tell() and (fh.seek(-1, 2), fh.read(1))[1] != b"\n":
                line = "\n" + line
        out.write(line)


def append_record_or_warn(path: Path, record: dict, warn: Callable[[str], None]) -> bool:
    """append_record for a command whose result is already made (evaluate, fuse): a run
    directory that cannot take the record (read-only, full disk) costs the record, not the
    result; ``warn`` gets one line saying so. True when the record was appended."""
    try:
        append_record(path, record)
        return True
    except (OSError, WriteRefused) as e:
        warn(f"mlx-tune: warning: could not append the {record.get('type')} record to {path} "
             f"({getattr(e, 'strerror', None) or e}); the result above is not in the run's "
             "history")
        return False


def repair_jsonl(path: Path, resume_step: int | None) -> int:
    """Keep only complete JSON records (and, when resuming, those with step <= resume_step).

    Rewrites the file atomically only when something is dropped; returns how many lines
    were dropped. Records without a ``step`` are kept (they cannot be placed in time), and
    so are ``supervisor`` records (supervise/night.py).
    """
    data = path.read_bytes()
    raw_lines = data.split(b"\n")
    # The last element is b"" when the file ends in a newline, else a torn tail.
    complete, tail = raw_lines[:-1], raw_lines[-1]
    keep: list[bytes] = []
    for raw in complete:
        rec = _parse_complete(raw)
        if rec is None:
            continue
        step = rec.get("step")
        # The supervisor's records tell of the night (a crash at step 40 before a resume
        # from 30): they stay when the steps after the resume point are redone.
        if (resume_step is not None and isinstance(step, (int, float)) and step > resume_step
                and rec.get("type") != "supervisor"):
            continue
        keep.append(raw + b"\n")
    dropped = len(complete) - len(keep) + (1 if tail else 0)
    if dropped:
        atomic_write(path, b"".join(keep))
    return dropped


class JsonlReporter(NullReporter):
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed per line.

    Records: ``{"type": "train"|"eval", **asdict(report)}``, ``{"type": "checkpoint",
    "step", "path"}``, ``{"type": "stop", "step", "reason", "exit_code"}``, plus
    ``{"type": "start", "step", "info"}`` and warning/error ``{"type": "message"}``.

    On open the file is repaired: a torn last line (killed mid-write) is dropped, and with
    ``resume_step=N`` every record past N is dropped too, so a resumed run appends without
    duplicating the steps it is about to redo.
    """

    def __init__(self, path: Path | str, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        open_append(self.path).close()  # a link or FIFO at the name is refused before use
        self.dropped = repair_jsonl(self.path, resume_step)
        self._step = resume_step or 0
        self._resume_step = resume_step
        self._fh: TextIO | None = open_append(self.path)

    def _append(self, record: dict) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(json_safe(record), default=str, allow_nan=False) + "\n")
        self._fh.flush()

    def on_start(self, info: dict) -> None:
        self._append({"type": "start", "step": self._step, "resume_step": self._resume_step,
                      "wall_time": time.time(), "info": info})

    def on_train(self, r: TrainReport) -> None:
        self._step = r.step
        self._append({"type": "train", **asdict(r)})

    def on_eval(self, r: EvalReport) -> None:
        self._step = max(self._step, r.step)
        self._append({"type": "eval", **asdict(r), "wall_time": time.time()})

    def on_test(self, score) -> None:
        self._append({"type": "test", **asdict(score), "wall_time": time.time()})

    def on_checkpoint(self, step: int, path: str) -> None:
        self._append({"type": "checkpoint", "step": step, "path": str(path), "wall_time": time.time()})

    def on_message(self, text: str, level: str = "info") -> None:
        if level in ("warning", "error"):  # info chatter belongs on the console only
            self._append({"type": "message", "step": self._step, "level": level,
                          "text": text, "wall_time": time.time()})

    def on_stop(self, reason: str, exit_code: int) -> None:
        self._append({"type": "stop", "step": self._step, "reason": reason,
                      "exit_code": exit_code, "wall_time": time.time()})

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close()
