"""--supervise without a model: how a child's end is judged, the restart policy, and the
parent driving stand-in children (crashes, a native abort with Metal's out-of-memory line,
a startup failure, a decision, forwarded signals, a kill -9 of the parent)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import mlx_tune
from mlx_tune.checkpoint.faults import METAL_OOM
from mlx_tune.config.spec import build_spec
from mlx_tune.exit_codes import (EXIT_BAD_DATA, EXIT_INTERRUPTED, EXIT_OVER_MEMORY_BUDGET,
                                 EXIT_PLATEAU, EXIT_SUPERVISOR_GAVE_UP)
from mlx_tune.reporting.summary import load_history, summarize
from mlx_tune.reporting.text import JsonlReporter
from mlx_tune.supervise.crashes import judge
from mlx_tune.supervise.night import Supervisor
from mlx_tune.supervise.policy import Policy, next_accumulation

# -- judging one ending ---------------------------------------------------------------


@pytest.mark.parametrize("returncode, log, oom, kind, memory", [
    (0, "", False, "finished", False),
    (EXIT_PLATEAU, "", False, "decision", False),
    (EXIT_BAD_DATA, "mlx-tune: error: train.jsonl:3: bad", False, "decision", False),
    (EXIT_INTERRUPTED, "", False, "decision", False),
    (-signal.SIGKILL, "", False, "crash", False),  # a kill: restart as it was
    (-signal.SIGKILL, "", True, "crash", True),  # the kernel counted an OOM kill meanwhile
    (-signal.SIGABRT, "step 3\n" + METAL_OOM + "\n", False, "crash", True),
    (-signal.SIGSEGV, "", False, "crash", False),
    (EXIT_OVER_MEMORY_BUDGET, "", False, "crash", True),
    (1, "mlx-tune: error: RuntimeError: [malloc] Unable to allocate 1073741824 bytes", False,
     "crash", True),
    (1, "[metal::malloc] Resource limit (499000) exceeded.", False, "crash", True),
    (1, "mlx-tune: error: OSError: input/output error", False, "crash", False),
    (7, "", False, "crash", False),  # checkpoint saves failed: the disk may come back
])
def test_each_ending_is_judged_by_its_status_and_log(returncode, log, oom, kind, memory):
    ending = judge(returncode, log, oom)
    assert (ending.kind, ending.memory) == (kind, memory)
    if returncode < 0:
        assert ending.code == 128 - returncode


def test_the_micro_batch_halves_to_a_divisor_of_the_batch():
    assert next_accumulation(8, 1) == 2
    assert next_accumulation(8, 2) == 4
    assert next_accumulation(6, 1) == 2  # micro-batch 6 -> 3
    assert next_accumulation(6, 2) == 6  # 3 -> 1 (no accumulation gives 1.5)
    assert next_accumulation(8, 8) is None


def test_the_same_out_of_memory_after_halving_twice_gives_up():
    policy = Policy(max_restarts=10, backoff_s=1.0, batch_size=16, accumulation=1)
    oom = judge(-signal.SIGABRT, METAL_OOM)
    first = policy.after_crash(oom, 40)
    assert first.kind == "restart" and first.accumulation == 2
    assert "16 -> 8 sequences" in first.reason and "the batch of 16 stays" in first.reason
    assert policy.micro_batch == 8
    assert policy.after_crash(oom, 40).accumulation == 4  # once more at the same step
    third = policy.after_crash(oom, 40)
    assert third.kind == "give_up" and "again after halving" in third.reason
    assert "after step 40" in third.reason and "Insufficient Memory" in third.reason


def test_out_of_memory_at_a_new_step_adapts_again_and_micro_batch_one_gives_up():
    policy = Policy(max_restarts=10, backoff_s=0.0, batch_size=4, accumulation=1)
    oom = judge(EXIT_OVER_MEMORY_BUDGET, "")
    assert policy.after_crash(oom, 10).accumulation == 2
    assert policy.after_crash(oom, 20).accumulation == 4
    last = policy.after_crash(oom, 30)
    assert last.kind == "give_up" and "micro-batch of 1" in last.reason


def test_restarts_back_off_while_no_progress_is_made_and_stop_at_max_restarts():
    policy = Policy(max_restarts=3, backoff_s=2.0, batch_size=8, accumulation=1)
    crash = judge(1, "mlx-tune: error: boom")
    delays = [policy.after_crash(crash, None).delay_s for _ in range(3)]
    assert delays == [2.0, 4.0, 8.0]
    last = policy.after_crash(crash, None)
    assert last.kind == "give_up" and "max_restarts (3)" in last.reason
    assert "boom" in last.reason and "before the first report" in last.reason
    moving = Policy(max_restarts=3, backoff_s=2.0, batch_size=8, accumulation=1)
    assert [moving.after_crash(crash, s).delay_s for s in (5, 9, 14)] == [2.0, 2.0, 2.0]


# -- the parent, driving stand-in children ----------------------------------------------

CHILD = r'''
import json, os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
plan = json.loads(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
calls = out / "calls.jsonl"
n = len(calls.read_text().splitlines()) if calls.exists() else 0
with open(calls, "a") as fh:
    fh.write(json.dumps({"argv": sys.argv[3:], "pid": os.getpid(),
                         "status": os.environ.get("MLX_TUNE_SUPERVISOR")}) + "\n")
action = plan[min(n, len(plan) - 1)]
if action == "early":  # dies before training: no start record
    (out / ".mlx-tune.lock").write_text("")
    sys.exit(1)
with open(out / "metrics.jsonl", "a") as fh:
    fh.write(json.dumps({"type": "start", "step": 10 * n, "info": {"accumulation": 1}}) + "\n")
    fh.write(json.dumps({"type": "train", "step": 10 * n + 5}) + "\n")
if action == "kill9":
    os.kill(os.getpid(), signal.SIGKILL)
if action == "metal":
    print("step 5 | loss=2.0", file=sys.stderr, flush=True)
    print(sys.argv[4] if len(sys.argv) > 4 else "", file=sys.stderr, flush=True)
    os.abort()
if action.startswith("exit"):
    print("mlx-tune: error: the same startup failure", file=sys.stderr, flush=True)
    sys.exit(int(action[4:]))
if action in ("wait", "slow"):
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    (out / f"ready-{n}").write_text("")
    deadline = time.time() + (1.5 if action == "slow" else 60)
    while not got and time.time() < deadline:
        time.sleep(0.05)
    (out / f"signals-{n}").write_text(json.dumps(got))
    sys.exit(130 if got else 0)
'''


def stand_in(tmp_path: Path, plan: list[str], **supervise) -> tuple[Supervisor, Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "run"
    spec = build_spec(overrides={"output_dir": str(out), "batch_size": 8,
                                 **{f"supervise.{k}": v for k, v in supervise.items()}})
    command = [sys.executable, str(script), str(out), json.dumps(plan), "train"]
    return Supervisor(spec, command, err=open(tmp_path / "stderr.txt", "w")), out


def calls(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "calls.jsonl").read_text().splitlines()]


def records(out: Path, kind: str = "supervisor") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("type") == kind]


def test_crashes_are_restarted_with_auto_resume_and_recorded(tmp_path):
    supervisor, out = stand_in(tmp_path, ["kill9", "exit1", "ok"], max_restarts=3, backoff_s=0)
    assert supervisor.run() == 0
    made = calls(out)
    assert len(made) == 3
    assert "--supervisor-restart" not in made[0]["argv"]
    assert all("--supervisor-restart" in c["argv"] for c in made[1:])
    assert "--gradient-accumulation-steps" not in made[2]["argv"]  # no memory trouble
    assert made[2]["status"].startswith("supervised: restart 2 of at most 3")
    events = records(out)
    assert [e["event"] for e in events] == ["restart", "restart"]
    assert events[0]["cause"] == "killed by SIGKILL" and events[0]["step"] == 5
    assert events[1]["cause"] == "exit 1" and "same startup failure" in events[1]["evidence"]


def test_restarts_repeat_the_users_choice_until_a_run_has_trained(tmp_path):
    supervisor, out = stand_in(tmp_path, ["early", "kill9", "ok"], backoff_s=0)
    supervisor.command.append("--force-fresh")
    assert supervisor.run() == 0
    made = calls(out)
    assert "--supervisor-restart" not in made[1]["argv"]  # nothing of this night to resume
    assert "--supervisor-restart" in made[2]["argv"]  # the second one trained


def test_a_metal_out_of_memory_abort_halves_the_micro_batch_once(tmp_path):
    script_arg = METAL_OOM
    supervisor, out = stand_in(tmp_path, ["metal", "ok"], max_restarts=3, backoff_s=0)
    supervisor.command.append(script_arg)  # the child prints it before aborting
    assert supervisor.run() == 0
    made = calls(out)
    argv = made[1]["argv"]
    assert argv[argv.index("--gradient-accumulation-steps") + 1] == "2"
    events = records(out)
    assert [e["event"] for e in events] == ["adaptation", "restart"]
    assert events[0]["accumulation_from"] == 1 and events[0]["accumulation_to"] == 2
    assert events[0]["micro_batch"] == 4 and "Insufficient Memory" in events[0]["evidence"]
    assert "micro-batch 4 (halved 1x" in made[1]["status"]
    assert METAL_OOM in (tmp_path / "stderr.txt").read_text()  # the child's log passed on
    summary = summarize(out, load_history(out))  # the morning report tells the night
    assert summary.supervisor_counts == {"restart": 1, "adaptation": 1, "cooldown": 0,
                                         "gave_up": 0}
    assert summary.supervisor[0].startswith(
        "adaptation: micro-batch 8 -> 4 (gradient_accumulation_steps 1 -> 2) after aborted "
        "(SIGABRT) after step 5: [METAL] Command buffer execution failed")
    assert summary.supervisor[1] == "restart 1: aborted (SIGABRT) after step 5"


def test_a_resumed_run_keeps_the_supervisor_records_past_its_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    night = [{"type": "train", "step": 4}, {"type": "train", "step": 9},
             {"type": "supervisor", "event": "restart", "step": 9}]
    path.write_text("".join(json.dumps(r) + "\n" for r in night))
    JsonlReporter(path, resume_step=4).close()  # what the restarted run does on opening
    assert [json.loads(line) for line in path.read_text().splitlines()] == [night[0], night[2]]


def test_the_same_startup_failure_gives_up_after_max_restarts(tmp_path):
    supervisor, out = stand_in(tmp_path, ["exit1"], max_restarts=2, backoff_s=0)
    assert supervisor.run() == EXIT_SUPERVISOR_GAVE_UP
    assert len(calls(out)) == 3  # the first run and two restarts
    assert [e["event"] for e in records(out)] == ["restart", "restart", "gave_up"]
    last = (tmp_path / "stderr.txt").read_text().strip().splitlines()[-1]
    assert last.startswith("mlx-tune: error: the supervisor gave up: the run crashed 3 times")
    assert "max_restarts (2)" in last and "the same startup failure" in last


def test_a_decision_is_passed_on_without_a_restart(tmp_path):
    supervisor, out = stand_in(tmp_path, [f"exit{EXIT_PLATEAU}", "ok"], max_restarts=3)
    assert supervisor.run() == EXIT_PLATEAU
    assert len(calls(out)) == 1 and records(out) == []


def test_a_cooldown_stops_the_child_cleanly_waits_and_resumes(tmp_path):
    supervisor, out = stand_in(tmp_path, ["wait", "ok"], cooldown_every_h=0.5 / 3600,
                               cooldown_s=0.2)
    assert supervisor.run() == 0
    made = calls(out)
    assert len(made) == 2 and "--supervisor-restart" in made[1]["argv"]
    assert json.loads((out / "signals-0").read_text()) == [signal.SIGTERM]  # asked once
    (cooldown,) = records(out)
    assert cooldown["event"] == "cooldown" and cooldown["seconds"] == 0.2


PARENT = r'''
import json, sys
from mlx_tune.config.spec import build_spec
from mlx_tune.supervise.night import Supervisor
out, child, plan = sys.argv[1], sys.argv[2], sys.argv[3]
spec = build_spec(overrides={"output_dir": out, "supervise.backoff_s": 0})
code = Supervisor(spec, [sys.executable, child, out, plan, "train"]).run()
heavy = [m for m in ("mlx", "mlx.core", "torch", "numpy") if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy}))
sys.exit(code)
'''


def start_parent(tmp_path: Path, plan: list[str]) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "parent.py").write_text(PARENT)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(mlx_tune.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(out),
                             str(tmp_path / "child.py"), json.dumps(plan)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_users_signal_reaches_the_child_once_and_its_code_is_the_nights(tmp_path, sig):
    proc, out = start_parent(tmp_path, ["wait"])
    wait_for(out / "ready-0", proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert json.loads((out / "signals-0").read_text()) == [sig]  # exactly once
    assert len(calls(out)) == 1  # the user's stop is never restarted
    assert json.loads(stdout) == {"code": EXIT_INTERRUPTED, "heavy": []}  # no model memory


def test_a_kill_9_of_the_parent_leaves_the_child_running_to_its_end(tmp_path):
    proc, out = start_parent(tmp_path, ["slow"])
    wait_for(out / "ready-0", proc)
    proc.kill()
    proc.wait()
    child = calls(out)[0]["pid"]
    os.kill(child, 0)  # still alive without its parent
    deadline = time.time() + 30
    while not (out / "signals-0").exists():  # it ran on to its own end, unsignalled
        assert time.time() < deadline
        time.sleep(0.05)
    assert json.loads((out / "signals-0").read_text()) == []


def test_supervise_on_a_rank_of_a_distributed_launch_is_refused(monkeypatch, tmp_path):
    from mlx_tune.cli import main

    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"]]))
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", str(hosts))
    monkeypatch.setenv("MLX_TUNE_NO_BLAS_FIX", "1")
    assert main(["train", "--model", "m", "--data", str(tmp_path), "--supervise"]) == 2


def test_the_dashboard_shows_the_supervisors_line_under_its_header():
    from rich.console import Console

    from mlx_tune.reporting.dashboard import RichDashboard

    console = Console(record=True, width=120, force_terminal=False)
    board = RichDashboard(8, console=console)
    board._info = {"model": "tiny", "supervisor": "supervised: restart 2 of at most 5, "
                   "micro-batch 2 (halved 1x after running out of memory)"}
    console.print(board.render())
    text = console.export_text()
    assert "supervised: restart 2 of at most 5, micro-batch 2 (halved 1x" in text
    board._info = {"model": "tiny"}  # an unsupervised run shows no such line
    console.print(board.render())
    assert console.export_text().count("supervised:") == 0
