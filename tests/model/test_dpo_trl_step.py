"""One DPO step of TRL's own DPOTrainer (peft, the tiny model) against our torch backend:
the same batch, the same LoRA weights, the same loss, rewards and LoRA gradients.

TRL builds the batch from the shipped pairs with its own tokenization and collator; our
step consumes exactly those rows (TRL's ``input_ids`` and ``completion_mask`` are our
``Batch.tokens`` and ``Batch.mask``), so the comparison covers the forward, the
reference pass with the adapter off, the per-row log-probs, the loss and its backward.
Our own tokenization of the same pairs is compared with TRL's rows separately.

The adapter starts from random A *and* B (peft's init has B = 0, where the policy equals
the reference and every A gradient is zero), copied by name into both models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("trl")

from mlx_tune.config.spec import build_spec  # noqa: E402
from mlx_tune.data.batch import Batch  # noqa: E402

pytestmark = pytest.mark.torch

PAIRS = 4
SHIPPED_PAIRS = Path(__file__).resolve().parents[2] / "data" / "preference" / "train.jsonl"
LORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.0}


@pytest.fixture(scope="module")
def preference_pairs() -> list[dict]:
    return [json.loads(line) for line in SHIPPED_PAIRS.read_text().splitlines()[:PAIRS]]


def our_backend(tiny_model, loss_type: str):
    from mlx_tune.backends.torch.backend import TorchBackend

    spec = build_spec(overrides={"model": str(tiny_model), "torch_threads": 1, "objective": "dpo",
                                 "preference.beta": 0.1, "preference.loss_type": loss_type,
                                 "max_length": 512, **LORA})
    backend = TorchBackend()
    backend.load(spec, tiny_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in backend.params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return backend


def trl_trainer(tiny_model, backend, pairs: list[dict], loss_type: str, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    # The base model and a peft_config, so that TRL's reference is the adapter switched
    # off (ours by default); handed a PeftModel, TRL would copy its adapter as "ref".
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    peft_config = LoraConfig(r=LORA["lora.rank"], lora_alpha=LORA["lora.alpha"], lora_dropout=0.0,
                             target_modules=backend.keys, bias="none", task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=PAIRS,
                     beta=0.1, loss_type=[loss_type], max_length=512, report_to=[], use_cpu=True,
                     dataloader_num_workers=0, bf16=False, gradient_checkpointing=False)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    trainer = DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer, peft_config=peft_config)
    assert "ref" not in trainer.model.peft_config
    theirs = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert theirs.keys() == backend.params.keys()
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(backend.params[name])
    return trainer, theirs


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_one_dpo_step_equals_trls_dpo_trainer(tiny_model, preference_pairs, loss_type, tmp_path):
    backend = our_backend(tiny_model, loss_type)
    trainer, theirs = trl_trainer(tiny_model, backend, preference_pairs[:PAIRS], loss_type, tmp_path)
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    batch = Batch(tokens=inputs["input_ids"].numpy().astype(np.int32),
                  mask=inputs["completion_mask"].numpy().astype(np.float32), paired=True)
    loss_sum, count, _, metrics = backend.step_fn.accumulate([batch])
    assert float(count) == PAIRS
    assert float(loss_sum / count) == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-6)
    assert abs(float(trl_loss) - np.log(2.0)) > 1e-3  # the policy is not the reference
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        total, n = metrics[name]
        assert float(total / n) == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name
    for name, p in backend.params.items():
        ours = p.grad / count
        assert theirs[name].grad.abs().sum() > 0, name
        scale = float(theirs[name].grad.abs().max())
        torch.testing.assert_close(ours, theirs[name].grad, rtol=1e-4, atol=1e-5 * scale)


def test_our_tokenization_matches_trls_rows(tiny_model, preference_pairs, tmp_path):
    """The same pairs through our data layer: TRL's token rows, and its completion mask
    except the separator the chat template writes after the end-of-turn token, which we
    do not train on (TRL does)."""
    from mlx_tune.data.tokenize import make_pair
    from mlx_tune.data.records import read_records

    backend = our_backend(tiny_model, "sigmoid")
    trainer, _ = trl_trainer(tiny_model, backend, preference_pairs[:PAIRS], "sigmoid", tmp_path)
    trl_rows = trainer.train_dataset
    for i, record in enumerate(read_records(SHIPPED_PAIRS)[:PAIRS]):
        ours = make_pair(record, backend.tokenizer, 512)
        for side in ("chosen", "rejected"):
            ids, mask = getattr(ours, side)
            expected = trl_rows[i]["prompt_ids"] + trl_rows[i][f"{side}_ids"]
            assert ids.tolist() == expected
            start = len(trl_rows[i]["prompt_ids"])
            assert not mask[:start].any() and mask[start:-1].all()
            assert mask[-1] == 0 and backend.tokenizer.decode(ids[-1:]).strip() == ""
