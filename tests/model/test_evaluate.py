"""`mlx-tune evaluate RUN_DIR`: a checkpoint's adapter scored on the test set, checked
against mlx-lm's own loader and cross-entropy by hand; its one-line errors."""

from __future__ import annotations

import json
import math
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_tune.cli import main
from mlx_tune.data.records import read_records
from mlx_tune.data.testing import write_jsonl
from mlx_tune.data.tokenize import make_example
from mlx_tune.training.recipe import train


# Checkpoints at steps 2 and 4, a learning rate that moves the adapter in 4 steps.
EVALUATED_RUN = {"max_steps": 4, "checkpoint_interval": 2, "learning_rate": 3e-3}


@pytest.fixture(scope="module")
def run(tiny_spec, recipe_slice, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    data = recipe_slice(tmp / "d")
    spec = tiny_spec(EVALUATED_RUN, data=data, output_dir=tmp / "r")
    assert train(spec, resume="fresh", log=lambda m: None).exit_code == 0
    return tmp / "r", data


def reference_loss(model_dir, run_dir, test_file, checkpoint=None):
    """mlx-lm's loader with the run's adapter (its weights replaced by a checkpoint's
    trainable arrays, read straight from the safetensors file, when given); the mean
    cross-entropy over every record's target tokens, by hand."""
    from mlx_lm.utils import load
    model, tok = load(str(model_dir), adapter_path=str(run_dir / "adapters"))
    if checkpoint is not None:
        arrays = mx.load(str(next(checkpoint.glob("arrays-*.safetensors"))))
        weights = {k[len("trainable/"):]: v for k, v in arrays.items()
                   if k.startswith("trainable/")}
        assert set(weights) == set(mx.load(str(run_dir / "adapters" / "adapters.safetensors")))
        model.load_weights(list(weights.items()), strict=False)
    total, count = 0.0, 0
    for record in read_records(test_file):
        ex = make_example(record, tok._tokenizer, True, 128)
        logits = np.array(model(mx.array(ex.ids[None, :-1])).astype(mx.float32))[0]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        targets, keep = ex.ids[1:], ex.mask[1:].astype(bool)
        total += -logp[np.arange(len(targets)), targets][keep].sum()
        count += int(keep.sum())
    return total / count, count


def last_record(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def test_final_and_step_n_match_mlx_lm(run, tiny_model, capsys):
    run_dir, data = run
    assert main(["evaluate", str(run_dir)]) == 0
    final = last_record(run_dir)
    assert final["type"] == "test" and final["checkpoint"] == "final" and final["step"] == 4
    want, count = reference_loss(tiny_model, run_dir, data / "test.jsonl")
    assert final["tokens"] == count
    assert math.isclose(final["loss"], want, rel_tol=1e-4)
    assert math.isclose(final["perplexity"], math.exp(want), rel_tol=1e-4)
    assert f"loss {final['loss']:.4f}" in capsys.readouterr().out

    assert main(["evaluate", str(run_dir), "--checkpoint", "step-2"]) == 0
    step2 = last_record(run_dir)
    assert step2["checkpoint"] == "step-2" and step2["step"] == 2
    want2, _ = reference_loss(tiny_model, run_dir, data / "test.jsonl",
                              run_dir / "checkpoints" / "step-0000002")
    assert math.isclose(step2["loss"], want2, rel_tol=1e-4)
    assert not math.isclose(want2, want, rel_tol=1e-3)  # the two really are different weights


def test_data_file_and_torn_metrics_tail(run, tiny_model):
    run_dir, data = run
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"type": "train", "step": 5, "lo')  # killed mid-write
    assert main(["evaluate", str(run_dir), "--data", str(data / "valid.jsonl")]) == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines[-2].endswith('"lo')  # the torn line is kept as it was, never rewritten
    record = json.loads(lines[-1])
    assert record["path"] == str(data / "valid.jsonl") and record["step"] == 4
    want, count = reference_loss(tiny_model, run_dir, data / "valid.jsonl")
    assert record["tokens"] == count and math.isclose(record["loss"], want, rel_tol=1e-4)


def test_one_line_errors(run, tmp_path, capsys):
    run_dir, data = run
    write_jsonl(tmp_path / "no_test" / "train.jsonl", [json.dumps({"text": "a b c"})])
    cases = [([str(tmp_path)], "no spec.yaml"),
             ([str(run_dir), "--checkpoint", "step-99"], "available: final, best, step-2, step-4"),
             ([str(run_dir), "--checkpoint", "latest"], "final, best or step-N"),
             ([str(run_dir), "--data", str(tmp_path / "no_test")], "no test set")]
    for argv, message in cases:
        before = (run_dir / "metrics.jsonl").read_text()
        assert main(["evaluate", *argv]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err
        assert (run_dir / "metrics.jsonl").read_text() == before


def test_torch_run_matches_peft(tiny_model, tiny_spec, recipe_slice, tmp_path, capsys):
    """The torch backend's adapters (peft's format) and checkpoints, checked against
    transformers + peft's own loader and cross-entropy by hand."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = recipe_slice(tmp_path / "d", train=8, test=4)
    run_dir = tmp_path / "r"
    spec = tiny_spec(EVALUATED_RUN, data=data, output_dir=run_dir, backend="torch",
                     torch_threads=1)
    assert train(spec, resume="fresh", log=lambda m: None).exit_code == 0
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model), torch_dtype=torch.float32),
        str(run_dir / "adapters")).eval()

    def loss() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for record in read_records(data / "test.jsonl"):
                ex = make_example(record, tok, True, 128)
                logits = model(torch.tensor(ex.ids[None, :-1].astype(np.int64))).logits[0]
                logp = torch.log_softmax(logits.double(), -1).numpy()
                keep = ex.mask[1:].astype(bool)
                total += -logp[np.arange(len(ex.ids) - 1), ex.ids[1:]][keep].sum()
                count += int(keep.sum())
        return total / count

    assert main(["evaluate", str(run_dir)]) == 0
    assert math.isclose(last_record(run_dir)["loss"], loss(), rel_tol=1e-4)
    arrays = load_file(str(next((run_dir / "checkpoints" / "step-0000002").glob("*.safetensors"))))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in arrays.items():
            if key.startswith("trainable/"):
                params[key[len("trainable/"):]].copy_(value)
    assert main(["evaluate", str(run_dir), "--checkpoint", "step-2"]) == 0
    record = last_record(run_dir)
    assert record["checkpoint"] == "step-2" and math.isclose(record["loss"], loss(), rel_tol=1e-4)
    capsys.readouterr()
    check_refusals(run_dir, "adapter_model.safetensors", tmp_path, capsys)  # peft's files


def test_a_directory_holding_only_test_jsonl_is_scored(run, tiny_model, tmp_path):
    run_dir, data = run
    only = tmp_path / "only-test"
    only.mkdir()
    shutil.copy(data / "test.jsonl", only / "test.jsonl")  # no train.jsonl: none is needed
    assert main(["evaluate", str(run_dir), "--data", str(only)]) == 0
    record = last_record(run_dir)
    want, count = reference_loss(tiny_model, run_dir, only / "test.jsonl")
    assert record["path"] == str(only / "test.jsonl") and record["tokens"] == count
    assert math.isclose(record["loss"], want, rel_tol=1e-4)


def damage_cases(adapters, weights):
    """(what it does to an adapter directory, the culprit the one line must name)."""
    config = adapters / "adapter_config.json"
    return [
        (lambda: os.truncate(adapters / weights, os.path.getsize(adapters / weights) - 64),
         f"{adapters / weights}: not a readable safetensors file"),
        (lambda: config.write_text(config.read_text()[:30]), f"{config}:"),
        (lambda: config.write_text("[]"), f"{config}: expected a JSON object")]


def check_refusals(run_dir, weights, tmp_path, capsys):
    """evaluate and fuse refuse each damaged adapter in one line naming it, write nothing."""
    pristine = tmp_path / "pristine"
    shutil.copytree(run_dir / "adapters", pristine)
    for i, (damage, culprit) in enumerate(damage_cases(run_dir / "adapters", weights)):
        damage()
        before = (run_dir / "metrics.jsonl").read_text()
        for argv in (["evaluate", str(run_dir)],
                     ["fuse", str(run_dir), "--output", str(tmp_path / f"fused{i}")]):
            assert main(argv) == 1, argv
            err = capsys.readouterr().err.strip()
            assert culprit in err and "\n" not in err and "Traceback" not in err, err
        assert (run_dir / "metrics.jsonl").read_text() == before
        assert not (tmp_path / f"fused{i}").exists()
        shutil.rmtree(run_dir / "adapters")
        shutil.copytree(pristine, run_dir / "adapters")


def test_damaged_adapters_are_one_line_errors(run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(run[0], run_dir)
    check_refusals(run_dir, "adapters.safetensors", tmp_path, capsys)
    # An adapter for modules this base does not have: named, before the model loads.
    weights = mx.load(str(run_dir / "adapters" / "adapters.safetensors"))
    mx.save_safetensors(str(run_dir / "adapters" / "adapters.safetensors"),
                        {k.replace("q_proj", "qkv_proj"): v for k, v in weights.items()})
    assert main(["evaluate", str(run_dir)]) == 1
    assert "self_attn.qkv_proj, which the base" in capsys.readouterr().err
