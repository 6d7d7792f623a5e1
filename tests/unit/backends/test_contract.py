"""The backend contract: one-process collectives, eval sums by name, the shared preamble,
and the framework-neutral packages that must not import a framework."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from mlx_tune.backends.base import EvalResult
from mlx_tune.backends.common import (adapted_layers, optimizer_args, refuse_full_quantized,
                                      step_config, weights_swapped, with_prefix)
from mlx_tune.config.spec import build_spec


def mlx_collectives():
    pytest.importorskip("mlx.core")
    from mlx_tune.backends.mlx.collectives import MlxCollectives
    return MlxCollectives()


def torch_collectives():
    torch = pytest.importorskip("torch")
    from mlx_tune.backends.torch.collectives import TorchCollectives
    return TorchCollectives(torch.device("cpu"))


@pytest.mark.parametrize("make", [mlx_collectives, torch_collectives], ids=["mlx", "torch"])
def test_one_process_collectives_return_their_input(make):
    comm = make()
    assert (comm.rank, comm.world_size) == (0, 1)
    assert comm.all_sum_ints([3, -1, 2**40]) == [3, -1, 2**40]
    data = b'{"step": 3}\x00\xff'
    assert comm.broadcast_bytes(data) == data
    arrays = {"w": np.array([-0.0, 1.5]), "n": np.array(7)}
    got = comm.broadcast_arrays(arrays)
    assert list(got) == ["w", "n"] and all(got[k] is arrays[k] for k in arrays)
    assert comm.broadcast_arrays(None) == {}


def test_eval_result_reads_sums_by_name():
    vector = [10.0, 4.0, 1.0, 4.0, 2.5, 2.0]
    result = EvalResult.from_vector(vector, ["accuracy", "rewards/margins"])
    assert (result.loss_sum, result.tokens) == (10.0, 4.0)
    assert result.metrics == {"accuracy": (1.0, 4.0), "rewards/margins": (2.5, 2.0)}
    assert result.as_vector() == vector and result.astuple() == (10.0, 4.0, 1.0, 2.5)
    assert result.means() == {"accuracy": 0.25, "rewards/margins": 1.25}
    twice = result + result
    assert twice.tokens == 8.0 and twice.metrics["rewards/margins"] == (5.0, 4.0)
    with pytest.raises(ValueError, match="expected 6 evaluation sums"):
        EvalResult.from_vector([1.0, 2.0], ["accuracy", "rewards/margins"])


# Logits [2, 0, 0, 0] at every position: each field has its own hand-computed value, so
# a sum put in another field's place fails. The masked-out position must not count.
V = 4
TOKENS = np.array([[1, 0, 2, 3]], dtype=np.int32)  # targets 0, 2, 3
MASK = np.array([[0, 1, 1, 0]], dtype=np.float32)  # targets 0 and 2 count
_Z = math.exp(2) + 3
P_TOP, P_REST = math.exp(2) / _Z, 1 / _Z
ENTROPY = -(P_TOP * math.log(P_TOP) + 3 * P_REST * math.log(P_REST))
EXPECTED = {"loss_sum": -math.log(P_TOP) - math.log(P_REST), "tokens": 2.0,
            "accuracy": 0.5,  # the argmax, token 0, is right for target 0 only
            "confidence": P_TOP, "entropy": ENTROPY}
LOGITS = np.zeros((1, TOKENS.shape[1], V), dtype=np.float32)
LOGITS[..., 0] = 2.0


def check_sums(vector) -> None:
    got = EvalResult.from_vector([float(v) for v in vector], ("accuracy", "confidence", "entropy"))
    means = {"loss_sum": got.loss_sum, "tokens": got.tokens, **got.means()}
    for name, want in EXPECTED.items():
        assert means[name] == pytest.approx(want, rel=1e-6), name


def test_mlx_eval_sums_are_in_field_order():
    mx = pytest.importorskip("mlx.core")
    from mlx_tune.backends.mlx.step import eval_sums

    def model(inputs):
        return mx.array(LOGITS[:, :inputs.shape[1]])
    check_sums(eval_sums(model, mx.array(TOKENS), mx.array(MASK)).tolist())


def test_torch_eval_sums_are_in_field_order():
    torch = pytest.importorskip("torch")
    from mlx_tune.backends.torch.step import eval_sums

    def forward(input_ids, use_cache):
        return SimpleNamespace(logits=torch.from_numpy(LOGITS[:, :input_ids.shape[1]]))
    check_sums(eval_sums(forward, torch.from_numpy(TOKENS).long(),
                         torch.from_numpy(MASK)).tolist())


def test_shared_spec_checks():
    lora = build_spec(overrides={"lora": {"layers": 8}})
    assert adapted_layers(lora, 8) == 8
    assert adapted_layers(build_spec(overrides={"lora": {"layers": -1}}), 5) == 5
    with pytest.raises(ValueError, match="lora.layers is 8 but the model has 4 blocks"):
        adapted_layers(lora, 4)
    full = build_spec(overrides={"fine_tune_type": "full"})
    refuse_full_quantized(full, None)
    refuse_full_quantized(lora, 4)
    with pytest.raises(ValueError, match="full cannot train a quantized base"):
        refuse_full_quantized(full, 4)


def test_step_config_and_optimizer_args_follow_the_spec():
    spec = build_spec(overrides={"grad_clip": 0.5, "ema": {"enabled": True, "decay": 0.9},
                                 "weight_decay": 0.02})
    cfg = step_config(spec, world_size=2)
    assert (cfg.grad_clip, cfg.ema_decay, cfg.world_size) == (0.5, 0.9, 2)
    assert step_config(build_spec(), 1).ema_decay is None
    assert optimizer_args(spec)["weight_decay"] == 0.02


def test_weights_swapped_puts_the_live_weights_back_after_an_error():
    live = {"w": 1.0}

    def load(weights):
        live.update(weights)
    with pytest.raises(RuntimeError), weights_swapped({"w": 2.0}, lambda: dict(live), load):
        assert live == {"w": 2.0}
        raise RuntimeError("evaluation failed")
    assert live == {"w": 1.0}
    with weights_swapped(None, lambda: pytest.fail("no EMA: no snapshot"), load):
        assert live == {"w": 1.0}


def test_with_prefix():
    arrays = {"trainable/a.b": 1, "ema/weights.a.b": 2, "trainable/c": 3}
    assert with_prefix(arrays, "trainable/") == {"a.b": 1, "c": 3}


def test_framework_neutral_packages_import_no_framework():
    code = ("import sys; import mlx_tune.distributed.decisions, mlx_tune.distributed.launch, "
            "mlx_tune.distributed.peers, mlx_tune.checkpoint.manager, mlx_tune.training.loop, "
            "mlx_tune.backends.common; "
            "bad = sorted({'mlx', 'torch'} & {m.split('.')[0] for m in sys.modules}); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
