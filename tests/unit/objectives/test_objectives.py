"""The objective seam on its own: the registry, settings checks, MLX ops against torch
ops, sums that add up exactly across micro-batches, and the layering (no framework
import inside mlx_tune/objectives)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from mlx_tune.objectives import OBJECTIVES, PreferenceSettings, RowLogps, get_objective

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from mlx_tune.backends.mlx.ops import MLX_OPS  # noqa: E402
from mlx_tune.backends.torch.ops import TORCH_OPS  # noqa: E402

OBJECTIVES_DIR = Path(__file__).resolve().parents[3] / "mlx_tune" / "objectives"
PAIRS = 5


def test_objectives_import_neither_mlx_nor_torch():
    found = []
    for path in sorted(OBJECTIVES_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("mlx", "torch")]
    assert list(OBJECTIVES_DIR.glob("*.py")) and found == []


def test_unknown_objective_is_refused_by_name():
    with pytest.raises(ValueError, match="objective: unknown 'ppo', expected one of sft, dpo"):
        get_objective("ppo")


@pytest.mark.parametrize("name,settings,message", [
    ("dpo", PreferenceSettings(loss_type="simpo"), "loss_type: objective dpo takes one of sigmoid"),
    ("dpo", PreferenceSettings(beta=0.0), "beta: must be > 0"),
    ("dpo", PreferenceSettings(loss_type="hinge", label_smoothing=0.1),
     "label_smoothing: loss_type hinge has no label smoothing"),
    ("dpo", PreferenceSettings(loss_type="robust", label_smoothing=0.5),
     "label_smoothing: robust DPO needs it below 0.5"),
    ("dpo", PreferenceSettings(simpo_gamma=1.0), "simpo_gamma: objective dpo does not use it"),
    ("sft", PreferenceSettings(beta=0.5), "beta: objective sft does not use it"),
    ("sft", PreferenceSettings(loss_type="sigmoid"), "loss_type: objective sft does not use it"),
])
def test_settings_an_objective_cannot_honour_are_refused_in_one_line(name, settings, message):
    with pytest.raises(ValueError, match=message) as caught:
        get_objective(name).check(settings)
    assert "\n" not in str(caught.value)


def test_settings_an_objective_uses_pass_its_check():
    get_objective("dpo").check(PreferenceSettings(beta=0.3, loss_type="sigmoid", label_smoothing=0.1))
    get_objective("dpo").check(PreferenceSettings(loss_type="robust", label_smoothing=0.2))
    get_objective("sft").check(PreferenceSettings(label_smoothing=0.1))


def row_inputs(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed per-row inputs for objective ``name``: logps, tokens, smooth, reference logps,
    and for KTO labels and the KL rows."""
    rng = np.random.default_rng(seed)
    rows = PAIRS * get_objective(name).rows_per_example
    tokens = rng.integers(1, 12, rows).astype(np.float32)
    logps = (-rng.uniform(0.2, 2.0, rows) * tokens).astype(np.float32)
    inputs = {"logps": logps, "tokens": tokens,
              "smooth": (logps * 3 - rng.uniform(0, 1, rows)).astype(np.float32),
              "ref": (logps + rng.normal(0, 1.5, rows)).astype(np.float32)}
    if name == "kto":
        inputs["labels"] = np.array([1, 0, 1, 1, 0][:rows], np.float32)
        inputs["kl"] = (logps[::-1] + rng.normal(0.5, 1.0, rows)).astype(np.float32)
        inputs["ref_kl"] = (inputs["kl"] - rng.normal(0.3, 0.5, rows)).astype(np.float32)
    return inputs


def settings_for(name: str, loss_type: str | None) -> PreferenceSettings:
    used = get_objective(name).settings_used
    smoothing = 0.1 if "label_smoothing" in used and loss_type in (None, "sigmoid", "robust") else 0.0
    return PreferenceSettings(beta=0.3 if "beta" in used else 0.1, loss_type=loss_type,
                              label_smoothing=smoothing)


def run(ops, to_array, name: str, settings: PreferenceSettings, inputs: dict, logps):
    """The objective's LossTerms with ``logps`` standing for the policy log-prob sums."""
    a = {k: to_array(v) for k, v in inputs.items()}
    policy = RowLogps(logps=logps, tokens=a["tokens"], smooth=a["smooth"])
    reference = RowLogps(logps=a["ref"], tokens=a["tokens"])
    extra = {}
    if name == "kto":
        extra = {"labels": a["labels"], "kl": RowLogps(a["kl"], a["tokens"]),
                 "reference_kl": RowLogps(a["ref_kl"], a["tokens"])}
    return get_objective(name).loss(ops, policy, reference, settings, **extra)


CASES = [(name, loss_type) for name, objective in OBJECTIVES.items()
         for loss_type in (objective.loss_types or (None,))]


@pytest.mark.parametrize("name,loss_type", CASES)
def test_mlx_ops_give_the_torch_ops_values_and_gradients(name, loss_type):
    inputs, settings = row_inputs(name), settings_for(name, loss_type)
    leaf = torch.tensor(inputs["logps"], requires_grad=True)
    t = run(TORCH_OPS, torch.tensor, name, settings, inputs, leaf)
    (t_grad,) = torch.autograd.grad(t.loss_sum / t.count, leaf)

    def mlx_loss(logps):
        terms = run(MLX_OPS, mx.array, name, settings, inputs, logps)
        return terms.loss_sum / terms.count

    m = run(MLX_OPS, mx.array, name, settings, inputs, mx.array(inputs["logps"]))
    m_grad = mx.grad(mlx_loss)(mx.array(inputs["logps"]))
    assert float(m.loss_sum) == pytest.approx(float(t.loss_sum), rel=1e-5)
    assert float(m.count) == float(t.count)
    assert np.abs(t_grad.numpy()).sum() > 0
    np.testing.assert_allclose(np.array(m_grad), t_grad.numpy(), rtol=1e-4, atol=1e-6)
    assert m.metrics.keys() == t.metrics.keys()
    for key, (total, count) in t.metrics.items():
        assert float(m.metrics[key][0]) == pytest.approx(float(total), rel=1e-5, abs=1e-6), key
        assert float(m.metrics[key][1]) == float(count), key


def split_rows(name: str, inputs: dict, parts: list[slice]) -> list[dict]:
    """Micro-batches of whole examples: paired objectives keep their chosen/rejected layout."""
    if get_objective(name).rows_per_example == 1:
        return [{k: v[s] for k, v in inputs.items()} for s in parts]
    half = len(next(iter(inputs.values()))) // 2
    return [{k: np.concatenate([v[:half][s], v[half:][s]]) for k, v in inputs.items()}
            for s in parts]


@pytest.mark.parametrize("name,loss_type", [c for c in CASES if c[0] != "kto"])
def test_sums_and_counts_add_up_exactly_across_micro_batches(name, loss_type):
    """Micro-batches of 2 and 3 examples give, summed and divided once, the loss, the
    gradient and the metrics of one batch of 5 (KTO's per-micro-batch KL baseline is
    the documented exception, tested in its own module)."""
    inputs, settings = row_inputs(name, seed=3), settings_for(name, loss_type)

    metrics: dict[int, dict] = {}

    def step_loss(logps, batches):
        total, count, offset, sums = 0.0, 0.0, 0, {}
        for part in batches:
            rows = len(part["logps"])
            terms = run(TORCH_OPS, torch.tensor, name, settings, part, logps[offset:offset + rows])
            total, count, offset = total + terms.loss_sum, count + terms.count, offset + rows
            for key, (s, c) in terms.metrics.items():
                s0, c0 = sums.get(key, (0.0, 0.0))
                sums[key] = (s0 + float(s), c0 + float(c))
        metrics[len(batches)] = {k: s / c for k, (s, c) in sums.items()}
        return total / count

    whole = torch.tensor(inputs["logps"], requires_grad=True)
    parts = split_rows(name, inputs, [slice(0, 2), slice(2, PAIRS)])
    order = np.concatenate([split_rows(name, {"i": np.arange(len(inputs["logps"]))}, [s])[0]["i"]
                            for s in (slice(0, 2), slice(2, PAIRS))])
    one, = torch.autograd.grad(step_loss(whole, [inputs]), whole)
    split_leaf = torch.tensor(inputs["logps"][order], requires_grad=True)
    loss_split = step_loss(split_leaf, parts)
    two, = torch.autograd.grad(loss_split, split_leaf)
    assert float(loss_split) == pytest.approx(float(step_loss(whole, [inputs])), rel=1e-6)
    torch.testing.assert_close(two, one[order])
    assert metrics[1].keys() == metrics[2].keys()
    for key, value in metrics[1].items():
        assert metrics[2][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_kto_adds_up_across_micro_batches_when_their_kl_baselines_agree():
    """KTO's baseline is per micro-batch (kto.py); where each micro-batch estimates the
    same baseline, its example sums add up to the whole batch's exactly, and where they
    estimate different ones, each micro-batch used its own."""
    inputs = row_inputs("kto", seed=4)
    inputs["ref_kl"] = inputs["kl"] - 0.8  # every KL row says 0.8
    settings = settings_for("kto", None)
    whole = run(TORCH_OPS, torch.tensor, "kto", settings, inputs, torch.tensor(inputs["logps"]))
    parts = [run(TORCH_OPS, torch.tensor, "kto", settings, part, torch.tensor(part["logps"]))
             for part in split_rows("kto", inputs, [slice(0, 2), slice(2, PAIRS)])]
    assert float(sum(p.loss_sum for p in parts)) == pytest.approx(float(whole.loss_sum), rel=1e-6)
    assert float(sum(p.count for p in parts)) == float(whole.count)
    for key in ("rewards/chosen", "rewards/accuracies", "kl"):
        total, count = (sum(float(p.metrics[key][i]) for p in parts) for i in (0, 1))
        assert total / count == pytest.approx(float(whole.metrics[key][0] / whole.metrics[key][1]))
    inputs["ref_kl"][:2] -= 5.0  # the first micro-batch now sees a larger baseline
    first = run(TORCH_OPS, torch.tensor, "kto", settings, split_rows("kto", inputs, [slice(0, 2)])[0],
                torch.tensor(inputs["logps"][:2]))
    assert float(first.metrics["kl"][0]) == pytest.approx(5.8, rel=1e-5)
