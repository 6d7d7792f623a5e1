"""An oversize first step stops before training with exit 11 and a proposal that, run as
proposed, fits (training/first_step.py, through the command line)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from mlx_tune.exit_codes import EXIT_OK, EXIT_OVER_MEMORY_BUDGET

MB = 2**20


@pytest.mark.slow
def test_an_oversize_first_step_stops_at_once_with_a_proposal_that_fits(
        tiny_model, recipe_slice, tmp_path, subprocess_env):
    pytest.importorskip("mlx.core")
    data = recipe_slice(tmp_path / "data", train=32, valid=4, test=1)

    def train(out, *flags):
        cmd = [sys.executable, "-m", "mlx_tune", "train", "--model", str(tiny_model),
               "--data", str(data), "--output-dir", str(out), "--backend", "mlx",
               "--batch-size", "8", "--max-length", "512", "--max-steps", "1",
               "--no-eval-at-start", "--num-samples", "0", "--dashboard", "plain",
               "--report-to", "[]", *flags]
        done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return done, records

    # The widest batch of micro-batch 8 x 512 needs ~600 MB on MLX's CPU backend (the
    # README's figure); a 0.35 GB budget (334 MiB) cannot hold it, a smaller micro-batch can.
    budget = "0.35"
    done, records = train(tmp_path / "over", "--memory-budget-gb", budget)
    assert done.returncode == EXIT_OVER_MEMORY_BUDGET, done.stderr[-2000:]
    first = records[0]["info"]["first_step"]
    assert first["micro_batch"] == 8 and first["width"] == 512
    assert first["peak_mb"] > first["budget_mb"] == pytest.approx(0.35e9 / MB, abs=0.1)
    stop = records[-1]
    assert stop["type"] == "stop" and stop["exit_code"] == EXIT_OVER_MEMORY_BUDGET
    # Before any step of the night (how long that takes is in the README, not here).
    assert not [r for r in records if r["type"] in ("train", "eval", "checkpoint")]
    proposal = re.search(r"try (--gradient-accumulation-steps (\d+)) \(micro-batch (\d+)",
                         stop["reason"])
    assert proposal, stop["reason"]
    steps, micro = int(proposal.group(2)), int(proposal.group(3))
    assert micro * steps == 8 and micro < 8
    # Run as proposed: the first step fits, and the run trains.
    done, records = train(tmp_path / "proposed", "--memory-budget-gb", budget,
                             "--gradient-accumulation-steps", str(steps))
    assert done.returncode == EXIT_OK, done.stderr[-2000:]
    fits = records[0]["info"]["first_step"]
    assert fits["micro_batch"] == micro and fits["peak_mb"] <= fits["budget_mb"]
