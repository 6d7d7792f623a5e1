"""Data parallel, in this process: how a batch is shared out across ranks, which launches
are refused, the collectives of one process, the watchdog and peer-failure exit codes.
The multi-process runs are in tests/e2e/test_distributed.py."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from mlx_tune.data.batch import Batch, shard_rows
from mlx_tune.distributed.decisions import agree, barrier, broadcast_flag, broadcast_stop, share_resume_point
from mlx_tune.distributed.launch import check_world
from mlx_tune.distributed.peers import EXIT_PEER_LOST, Watchdog, peer_guard
from mlx_tune.exit_codes import StopDecision
from mlx_tune.config.schema import SpecError
from mlx_tune.config.spec import build_spec


def test_batch_that_ranks_cannot_share_is_a_one_line_error():
    spec = build_spec(overrides={"batch_size": 6})
    check_world(spec, 1)
    check_world(spec, 2)
    with pytest.raises(SpecError, match=r"batch_size=6 cannot be split evenly across 4 "
                                         r"data-parallel ranks: use a multiple of 4"):
        check_world(spec, 4)
    with pytest.raises(SpecError, match="is 3 per rank, which gradient_accumulation_steps=2"):
        check_world(build_spec(overrides={"batch_size": 6, "gradient_accumulation_steps": 2}), 2)


def test_ranks_the_backend_cannot_see_are_refused(monkeypatch):
    spec = build_spec(overrides={"batch_size": 8})
    for var in ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "RANK",
                "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    check_world(spec, 1, "mlx")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SpecError, match="one of 2 ranks started by torchrun, but the mlx "
                                        "backend sees a single process: add --backend torch"):
        check_world(spec, 1, "mlx")
    check_world(spec, 2, "torch")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_WORLD_SIZE", "3")
    with pytest.raises(SpecError, match="started by mlx.launch, but the torch backend"):
        check_world(spec, 1, "torch")


def test_one_process_collectives_are_identities():
    one = type("B", (), {"rank": 0, "world_size": 1})()
    stop = StopDecision("plateau", "flat", 7)
    assert agree(stop, None, one) == (stop, None)
    assert broadcast_stop(None, one) is None
    assert broadcast_flag(True, one) is True
    assert share_resume_point(one, None, Path("."), None, print) is None
    barrier(one)


def test_watchdog_ends_a_stalled_rank_with_the_peer_lost_code(capsys):
    codes: list[int] = []
    with Watchdog(rank=1, world=2, timeout=0.2, exit=codes.append) as dog:
        time.sleep(0.4)
        assert codes == []  # not armed before the first step
        dog.beat()
        deadline = time.time() + 5
        while not codes and time.time() < deadline:
            time.sleep(0.05)
    assert codes == [EXIT_PEER_LOST]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlx-tune: error: rank 1/2: no training step "
                                               "finished in 0.2 s")
    with Watchdog(rank=0, world=1, timeout=0.01, exit=codes.append) as dog:
        dog.beat()
        time.sleep(0.1)
    assert codes == [EXIT_PEER_LOST]  # a single process never starts it


def test_peer_failures_become_exit_code_8(capsys):
    two = type("B", (), {"rank": 1, "world_size": 2})()
    with pytest.raises(SystemExit) as e, peer_guard(two):
        raise RuntimeError("[ring] connection to a peer was lost")
    assert e.value.code == EXIT_PEER_LOST
    assert "rank 1/2: lost contact with another rank" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="other"), peer_guard(two):
        raise RuntimeError("other")  # not a peer failure: untouched


def test_validation_rows_are_shared_out():
    b = Batch(np.arange(10, dtype=np.int32).reshape(5, 2), np.ones((5, 2), np.float32))
    parts = [shard_rows(b, r, 2) for r in range(2)]
    assert np.array_equal(np.concatenate([p.tokens for p in parts]), b.tokens)
    assert shard_rows(Batch(b.tokens[:1], b.mask[:1]), 1, 2) is None
    assert shard_rows(b, 0, 1) is b
    packed = Batch(b.tokens, b.mask, np.array([[1, 1], [1, 2], [1, 1], [1, 0], [1, 2]]))
    parts = [shard_rows(packed, r, 2) for r in range(2)]
    assert np.array_equal(np.concatenate([p.segments for p in parts]), packed.segments)


def test_packed_all_sum_keeps_the_tree():
    mx = pytest.importorskip("mlx.core")
    from mlx_tune.backends.mlx.collectives import all_sum_packed
    tree = {"a": [mx.ones((2, 3)), mx.zeros((4,), dtype=mx.bfloat16)], "b": mx.array(2.5)}
    out, s1, s2 = all_sum_packed(tree, mx.array(3.0), mx.array(5.0))
    assert out["a"][0].shape == (2, 3) and out["a"][1].dtype == mx.bfloat16
    assert out["b"].item() == 2.5 and s1.item() == 3.0 and s2.item() == 5.0
