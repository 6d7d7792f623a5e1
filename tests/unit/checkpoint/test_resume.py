"""Resume decisions: fingerprints, every mode, moving a run aside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlx_tune.checkpoint.manager import CheckpointManager, NumpyCodec
from mlx_tune.checkpoint.resume import (
    FINGERPRINT_KEY,
    ResumeError,
    compare_fingerprints,
    decide_resume,
    normalize_fingerprint,
    move_run_aside,
)

SPEC = {"model": "mlx-community/Qwen3-0.6B-4bit", "fine_tune_type": "lora",
        "lora": {"rank": 8, "layers": 16, "targets": ("q_proj", "v_proj")},
        "quantize": None}
FP = normalize_fingerprint(SPEC)


def spec_with(**lora) -> dict:
    return normalize_fingerprint(dict(SPEC, lora=dict(SPEC["lora"], **lora)))


def never_ask(prompt: str) -> str:
    raise AssertionError(f"should not ask: {prompt}")


@pytest.fixture
def run(tmp_path):
    """An output dir with checkpoints at steps 1 and 2 (2 is the newest)."""
    out = tmp_path / "run"
    logs: list[str] = []
    m = CheckpointManager(out / "checkpoints", NumpyCodec(), log=logs.append)
    for step in (1, 2):
        m.save(step, {"w": np.full((2, 2), step, np.float32)}, {FINGERPRINT_KEY: FP, "s": step})
    (out / "metrics.jsonl").write_text('{"step": 2}\n')
    return out, m, logs


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_flattens_and_survives_json():
    assert FP["lora.rank"] == 8 and FP["lora.targets"] == ["q_proj", "v_proj"]
    assert normalize_fingerprint({"path": Path("/x")}) == {"path": "/x"}
    assert compare_fingerprints(FP, FP) == ([], [])


def test_compare_names_each_differing_field():
    current = normalize_fingerprint(dict(SPEC, model="other", lora=dict(SPEC["lora"], rank=16),
                               train={"iters": 2000}))
    saved = dict(FP, **{"train.iters": 1000})
    blocking, harmless = compare_fingerprints(saved, current, harmless={"train"})
    assert blocking == ["lora.rank: checkpoint 8, spec 16",
                        "model: checkpoint mlx-community/Qwen3-0.6B-4bit, spec other"]
    assert harmless == ["train.iters: checkpoint 1000, spec 2000"]
    blocking, _ = compare_fingerprints(FP, dict(FP, dropout=0.1))
    assert blocking == ["dropout: checkpoint <absent>, spec 0.1"]


# ---------------------------------------------------------------- modes


def test_auto_resumes_newest_valid_without_asking(run):
    out, m, logs = run
    loaded = decide_resume(m, current_fingerprint=FP, mode="auto", interactive=False,
                           ask=never_ask, log=logs.append)
    assert loaded.step == 2 and loaded.meta["s"] == 2
    np.testing.assert_array_equal(loaded.arrays["w"], np.full((2, 2), 2, np.float32))


def test_auto_falls_back_past_a_corrupt_checkpoint(run):
    out, m, logs = run
    (out / "checkpoints/step-0000002/arrays-00000.safetensors").write_bytes(b"junk")
    loaded = decide_resume(m, current_fingerprint=FP, mode="auto", interactive=False,
                           ask=never_ask, log=logs.append)
    assert loaded.step == 1
    assert any(line.startswith("skipping checkpoints/step-0000002: size mismatch")
               for line in logs)


@pytest.mark.parametrize("answer", ["", "y", "YES ", "n", "no"])
def test_ask_on_terminal(run, answer):
    out, m, logs = run
    prompts: list[str] = []

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return answer

    loaded = decide_resume(m, current_fingerprint=FP, mode="ask", interactive=True,
                           ask=ask, log=logs.append)
    assert prompts == ["Resume from step 2? [Y/n] "]
    if answer.strip().lower() in ("", "y", "yes"):
        assert loaded.step == 2 and out.exists()
    else:  # "no" means a fresh start: the old run is moved aside, not deleted
        assert loaded is None and list(out.iterdir()) == []
        (aside,) = out.parent.glob("run.old-*")
        assert (aside / "metrics.jsonl").read_text() == '{"step": 2}\n'
        assert len(list((aside / "checkpoints").glob("step-*"))) == 2


def test_ask_repeats_on_unclear_answer_then_gives_up(run):
    out, m, logs = run
    answers = iter(["maybe", "y"])
    loaded = decide_resume(m, current_fingerprint=FP, mode="ask", interactive=True,
                           ask=lambda p: next(answers), log=logs.append)
    assert loaded.step == 2
    with pytest.raises(ResumeError, match="--auto-resume"):
        decide_resume(m, current_fingerprint=FP, mode="ask", interactive=True,
                      ask=lambda p: "what", log=logs.append)


def test_ask_eof_is_a_clear_error(run):
    out, m, logs = run

    def eof(prompt: str) -> str:
        raise EOFError

    with pytest.raises(ResumeError, match="--force-fresh"):
        decide_resume(m, current_fingerprint=FP, mode="ask", interactive=True, ask=eof,
                      log=logs.append)


def test_ask_without_terminal_refuses_naming_both_flags(run):
    out, m, logs = run
    with pytest.raises(ResumeError) as ei:
        decide_resume(m, current_fingerprint=FP, mode="ask", interactive=False,
                      ask=never_ask, log=logs.append)
    msg = str(ei.value)
    assert "--auto-resume" in msg and "--force-fresh" in msg and "step 2" in msg
    assert out.exists()  # nothing moved or touched


def test_no_checkpoint_starts_fresh_without_asking(tmp_path):
    logs: list[str] = []
    m = CheckpointManager(tmp_path / "run" / "checkpoints", NumpyCodec(), log=logs.append)
    for interactive in (True, False):
        assert decide_resume(m, current_fingerprint=FP, mode="ask", interactive=interactive,
                             ask=never_ask, log=logs.append) is None


@pytest.mark.parametrize("mode", ["auto", "ask"])
def test_fingerprint_mismatch_refuses_naming_fields(run, mode):
    out, m, logs = run
    with pytest.raises(ResumeError) as ei:
        decide_resume(m, current_fingerprint=spec_with(rank=16, layers=8), mode=mode,
                      interactive=True, ask=never_ask, log=logs.append)
    msg = str(ei.value)
    assert "lora.rank: checkpoint 8, spec 16" in msg and "lora.layers: checkpoint 16, spec 8" in msg
    assert "--force-fresh" in msg and "--output-dir" in msg and "\n" not in msg


def test_missing_fingerprint_blocks(tmp_path):
    m = CheckpointManager(tmp_path / "run" / "checkpoints", NumpyCodec(), log=lambda s: None)
    m.save(1, {"w": np.zeros(2, np.float32)}, {"s": 1})
    with pytest.raises(ResumeError, match="fingerprint: missing"):
        decide_resume(m, current_fingerprint=FP, mode="auto", interactive=False)


def test_harmless_difference_is_logged_and_resumes(tmp_path):
    logs: list[str] = []
    m = CheckpointManager(tmp_path / "run" / "checkpoints", NumpyCodec(), log=logs.append)
    m.save(3, {"w": np.zeros(2, np.float32)},
           {FINGERPRINT_KEY: dict(FP, **{"train.iters": 1000})})
    loaded = decide_resume(m, current_fingerprint=dict(FP, **{"train.iters": 3000}),
                           mode="auto", interactive=False, log=logs.append,
                           harmless_fields=["train.iters"])
    assert loaded.step == 3
    assert any("train.iters: checkpoint 1000, spec 3000" in line for line in logs)


def test_fresh_moves_old_run_aside_keeping_everything(run):
    out, m, logs = run
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert decide_resume(m, current_fingerprint=spec_with(rank=64), mode="fresh",
                         interactive=False, ask=never_ask, log=logs.append) is None
    assert list(out.iterdir()) == []  # emptied, not renamed: a lock inside it stays held
    (aside,) = out.parent.glob("run.old-*")
    assert sorted(p.relative_to(aside) for p in aside.rglob("*")) == before
    assert m.discover() == [] and m.latest_valid() is None
    # The manager keeps working in the now-empty output dir.
    m.save(1, {"w": np.zeros(2, np.float32)}, {})
    assert [s for _, s in m.discover()] == [1]


def test_fresh_with_nothing_there_is_a_no_op(tmp_path):
    m = CheckpointManager(tmp_path / "run" / "checkpoints", NumpyCodec(), log=lambda s: None)
    assert decide_resume(m, current_fingerprint=FP, mode="fresh", interactive=False) is None
    assert list(tmp_path.iterdir()) == []


def test_move_run_aside_never_overwrites(tmp_path):
    dests = []
    for i in range(3):
        out = tmp_path / "run"
        out.mkdir(exist_ok=True)
        (out / "spec.yaml").write_text(str(i))
        dests.append(move_run_aside(out))
    assert len(set(dests)) == 3
    assert sorted((d / "spec.yaml").read_text() for d in dests) == ["0", "1", "2"]
    assert all(d.name.startswith("run.old-") and d.name.endswith(("Z", "-1", "-2")) for d in dests)
    with pytest.raises(FileNotFoundError):
        move_run_aside(tmp_path / "missing")


def test_unknown_mode_rejected(run):
    out, m, logs = run
    with pytest.raises(ValueError):
        decide_resume(m, current_fingerprint=FP, mode="maybe", interactive=False)  # type: ignore[arg-type]
