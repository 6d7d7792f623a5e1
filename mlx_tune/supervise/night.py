"""The supervisor process: runs `mlx-tune train` as a child and gets it back up.

The child is the same command line with ``--no-supervise``, in its own session, so a
Ctrl-C at the terminal reaches the parent alone and the child gets exactly one signal
(forwarded). Its stdout is the parent's (the dashboard draws as usual); its stderr goes
to an unlinked append-only file that the parent copies to its own stderr and reads the
crash evidence from. A pipe would not do: a parent killed with -9 would leave the child
writing into a broken pipe. With the file, the child finishes its run (or stops cleanly
on its own signals) and the run lock, held by the child, keeps a second trainer out.

Once a run of the night has started training, restarts pass ``--supervisor-restart``
(resume from the newest checkpoint without asking, whatever --force-fresh the command
had); after an out-of-memory crash, ``--gradient-accumulation-steps N`` too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

from mlx_tune.checkpoint.rundir import RUN_MARKERS
from mlx_tune.config.schema import Spec, SpecError
from mlx_tune.distributed.launch import launched_world
from mlx_tune.exit_codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_SUPERVISOR_GAVE_UP
from mlx_tune.reporting.text import append_record
from mlx_tune.supervise import STATUS_ENV
from mlx_tune.supervise.crashes import Ending, judge, oom_kill_count, read_progress, signal_name
from mlx_tune.supervise.policy import Policy

FORWARDED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
TAIL_BYTES = 64 * 1024  # of the child's stderr, kept for the crash evidence
POLL_S = 0.1


def supervise(spec: Spec, argv: Sequence[str]) -> int:
    """`mlx-tune train ... --supervise`: the whole night; returns the exit code."""
    ranks, launcher = launched_world()
    if ranks > 1:  # one parent per rank would restart each rank on its own
        raise SpecError(f"--supervise runs one training process, but this is one of {ranks} "
                        f"ranks started by {launcher}; supervise the launcher instead, or "
                        "drop --supervise")
    return Supervisor(spec, child_command(argv)).run()


def child_command(argv: Sequence[str]) -> list[str]:
    """The child's command line: this one, run by the same Python, unsupervised (the last
    --[no-]supervise wins, so appending is enough)."""
    return [sys.executable, "-m", "mlx_tune", *argv, "--no-supervise"]


@dataclass
class Segment:
    """One child process: how it ended and what it left in its log."""

    returncode: int
    log_tail: str
    oom_killed: bool


class Supervisor:
    def __init__(self, spec: Spec, command: list[str], *, err: TextIO | None = None,
                 env: dict | None = None, sleep: Callable[[float], None] | None = None):
        self.spec, self.command = spec, command
        self.settings = spec.supervise
        self.output_dir = Path(spec.output_dir)
        self.err = err or sys.stderr
        self.env = dict(os.environ if env is None else env)
        accumulation = spec.gradient_accumulation_steps
        self.policy = Policy(self.settings.max_restarts, self.settings.backoff_s,
                             spec.batch_size, accumulation if isinstance(accumulation, int) else 1)
        self.child: subprocess.Popen | None = None
        self.user_signal: int | None = None
        self._cooling = False  # this child was asked to stop for a cooldown
        self.cooldowns = 0

    # -- the night ------------------------------------------------------------------
    def run(self) -> int:
        old = {sig: signal.signal(sig, self._forward) for sig in FORWARDED}
        try:
            return self._night()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _night(self) -> int:
        restart_resumes = False
        while True:
            before = read_progress(self.output_dir)
            segment = self._run_child(restart_resumes)
            if self.user_signal is not None:
                # The user asked the run to stop: its answer is the night's answer.
                code = segment.returncode
                return 128 - code if code < 0 else code
            after = read_progress(self.output_dir)
            if after.starts > before.starts:  # it got past its resume decision and trained
                # From now on the run's checkpoints are this night's: restarts resume them.
                # Until then a restart repeats the user's own choice (--force-fresh, or a
                # question a run without a terminal refuses to guess).
                restart_resumes = True
                if after.accumulation is not None:
                    self.policy.accumulation = after.accumulation  # 'auto' as resolved
            ending = judge(segment.returncode, segment.log_tail, segment.oom_killed)
            if self._cooling and segment.returncode in (EXIT_INTERRUPTED, -signal.SIGTERM):
                if not self._cooldown(after.step):
                    return EXIT_INTERRUPTED
                continue
            if ending.kind != "crash":
                if ending.kind == "finished" and (self.policy.restarts or self.cooldowns):
                    self._say(f"finished after {self.policy.restarts} restart(s), "
                              f"{len(self.policy.adaptations)} adaptation(s) and "
                              f"{self.cooldowns} cooldown(s)")
                return ending.code
            if not self._after_crash(ending, after.step):
                return EXIT_SUPERVISOR_GAVE_UP if self.user_signal is None else EXIT_INTERRUPTED

    def _after_crash(self, ending: Ending, step: int | None) -> bool:
        """Record the crash and wait out the backoff; False: give up (or stopped)."""
        action = self.policy.after_crash(ending, step)
        base = {"step": step, "cause": ending.cause, "memory": ending.memory,
                "evidence": ending.evidence, "exit_code": ending.code}
        if action.kind == "give_up":
            self._record("gave_up", base, action.reason)
            print(f"mlx-tune: error: the supervisor gave up: {action.reason}", file=self.err,
                  flush=True)
            return False
        if action.accumulation is not None:
            old, new = self.policy.adaptations[-1]
            self._record("adaptation", {**base, "accumulation_from": old, "accumulation_to": new,
                                        "micro_batch": self.policy.micro_batch,
                                        "batch_size": self.spec.batch_size}, action.reason)
        self._record("restart", {**base, "restart": self.policy.restarts,
                                 "delay_s": action.delay_s}, action.reason)
        self._say(f"the run crashed: {action.reason}; resuming in {action.delay_s:g} s")
        return self._wait(action.delay_s)

    def _cooldown(self, step: int | None) -> bool:
        self.cooldowns += 1
        seconds = self.settings.cooldown_s
        reason = (f"cooldown {self.cooldowns} after {self.settings.cooldown_every_h:g} h of "
                  f"training: paused at step {step} for {seconds:g} s")
        self._record("cooldown", {"step": step, "seconds": seconds}, reason)
        self._say(reason + "; it resumes by itself")
        return self._wait(seconds)

    # -- one child ------------------------------------------------------------------
    def _run_child(self, resume: bool) -> Segment:
        command = list(self.command)
        if resume:
            command.append("--supervisor-restart")
        if self.policy.adaptations:
            command += ["--gradient-accumulation-steps", str(self.policy.accumulation)]
        env = {**self.env, STATUS_ENV: self.status()}
        self._cooling = False
        oom_before = oom_kill_count()
        log_dir = tempfile.mkdtemp(prefix="mlx-tune-supervisor-")
        log_path = os.path.join(log_dir, "stderr")
        fd = os.open(log_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        os.unlink(log_path)
        os.rmdir(log_dir)
        started, offset, tail = time.monotonic(), 0, b""
        try:
            self.child = subprocess.Popen(command, stderr=fd, env=env, start_new_session=True)
            if self.user_signal is not None:  # a signal between two children
                self.child.send_signal(self.user_signal)
            while True:
                returncode = self.child.poll()
                offset, tail = self._pump(fd, offset, tail)
                if returncode is not None:
                    break
                if self._cooldown_due(started):
                    self._cooling = True
                    self.child.send_signal(signal.SIGTERM)  # checkpoint and exit cleanly
                time.sleep(POLL_S)
        finally:
            self.child = None
            os.close(fd)
        oom_after = oom_kill_count()
        return Segment(returncode, tail.decode("utf-8", "replace"),
                       oom_before is not None and oom_after is not None and oom_after > oom_before)

    def _pump(self, fd: int, offset: int, tail: bytes) -> tuple[int, bytes]:
        """Copy what the child wrote to stderr since ``offset`` to ours; keep the tail."""
        while True:
            chunk = os.pread(fd, 1 << 16, offset)
            if not chunk:
                return offset, tail
            offset += len(chunk)
            tail = (tail + chunk)[-TAIL_BYTES:]
            try:
                self.err.write(chunk.decode("utf-8", "replace"))
                self.err.flush()
            except (OSError, ValueError):  # our stderr is gone: keep supervising
                pass

    def _cooldown_due(self, started: float) -> bool:
        every = self.settings.cooldown_every_h
        return (bool(every) and not self._cooling and self.user_signal is None
                and time.monotonic() - started >= every * 3600)

    def _forward(self, signum: int, frame: object) -> None:
        self.user_signal = signum
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` between two children; False when the user stopped the night."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.user_signal is not None:
                break
            time.sleep(min(POLL_S, max(end - time.monotonic(), 0)))
        if self.user_signal is not None:
            self._say(f"stopped by {signal_name(self.user_signal)} between two runs; resume "
                      "with the same command (it resumes from the last checkpoint)")
            return False
        return True

    # -- what the night leaves behind -----------------------------------------------
    def status(self) -> str:
        """One line for the child's dashboard: restarts so far, the micro-batch."""
        p = self.policy
        parts = [f"supervised: restart {p.restarts} of at most {p.max_restarts}"]
        if p.adaptations:
            parts.append(f"micro-batch {p.micro_batch} (halved {len(p.adaptations)}x after "
                         "running out of memory)")
        if self.cooldowns:
            parts.append(f"{self.cooldowns} cooldown(s)")
        return ", ".join(parts)

    def _record(self, event: str, fields: dict, reason: str) -> None:
        """One ``supervisor`` record in metrics.jsonl, once the run has a directory of its
        own there (never into a folder that is not a run's)."""
        if not any((self.output_dir / name).exists() for name in RUN_MARKERS):
            return
        try:
            append_record(self.output_dir / "metrics.jsonl",
                          {"type": "supervisor", "event": event, **fields, "reason": reason,
                           "wall_time": time.time()})
        except OSError as e:
            self._say(f"warning: could not append to {self.output_dir / 'metrics.jsonl'}: "
                      f"{e.strerror or e}")

    def _say(self, text: str) -> None:
        try:
            print(f"mlx-tune supervisor: {text}", file=self.err, flush=True)
        except (OSError, ValueError):
            pass

