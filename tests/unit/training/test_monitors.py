"""Tests for mlx_tune.training.monitors: every rule on crafted sequences, and resume."""

from __future__ import annotations

import json
import math

import pytest

from mlx_tune.config.schema import EarlyStoppingSpec, SpecError
from mlx_tune.config.spec import build_spec
from mlx_tune.exit_codes import StopDecision
from mlx_tune.training.monitors import (
    EarlyStopping,
    MovingAverage,
    ThroughputMeter,
)

NAN, INF = float("nan"), float("inf")


def cfg(**kw) -> EarlyStoppingSpec:
    base = dict(warmup=0, check_every=10, loss_window=10, patience=3, min_delta=0.01)
    return EarlyStoppingSpec(**(base | kw))


def feed(es: EarlyStopping, seq, start: int = 0):
    """Feed (loss, grad, finite) tuples; return the first decision and its index."""
    for i, (loss, grad, finite) in enumerate(seq, start):
        d = es.observe_step(i, loss, grad, finite)
        if d is not None:
            return d
    return None


def healthy(n, loss=2.0, grad=1.0):
    return [(loss, grad, True)] * n


# ------------------------------------------------------------ MovingAverage
def test_moving_average_math():
    ma = MovingAverage(window=4)
    assert ma.value is None and ma.trend is None and len(ma) == 0
    assert ma.add(1.0)
    assert ma.value == 1.0 and ma.trend is None
    for v in (2.0, 3.0, 4.0, 5.0, 6.0):
        ma.add(v)
    assert ma.value == 4.5 and len(ma) == 4  # window holds 3,4,5,6
    assert ma.trend == 2.0  # mean(5,6) - mean(3,4)
    assert not ma.add(NAN) and not ma.add(INF)
    assert ma.value == 4.5 and len(ma) == 4
    odd = MovingAverage(window=5)
    for v in (5.0, 4.0, 100.0, 2.0, 1.0):  # middle value left out of the trend
        odd.add(v)
    assert odd.trend == -3.0
    restored = MovingAverage(window=4)
    restored.load_state_dict(json.loads(json.dumps(ma.state_dict())))
    assert restored.value == ma.value and restored.trend == ma.trend
    with pytest.raises(ValueError):
        MovingAverage(0)


# ------------------------------------------------------------ rules
def test_plateau_fires_at_exact_step_with_numbers():
    es = EarlyStopping(cfg())
    # steps 0..29 descending loss, then flat at 1.5 forever
    seq = [(3.0 - 0.05 * i, 1.0, True) for i in range(30)] + healthy(200, loss=1.5)
    d = feed(es, seq)
    # checks at 0,10,...: best stops improving once the window is flat (step 40: avg 1.5)
    # step 40 improves (avg 1.5 < 1.6775), then 50, 60, 70 do not -> fires at 70
    assert d == StopDecision(
        "plateau",
        "training loss plateaued: moving average 1.5000 has not improved by 0.01 over 3 checks "
        "(best 1.5000 at step 40)",
        70,
    )
    assert d.exit_code == 3 and es.plateau_counter == 3 and es.last_step == 70


def test_plateau_min_delta_boundary():
    # windows of 1 value make the moving average the loss itself
    def run(losses, min_delta):
        es = EarlyStopping(cfg(loss_window=1, check_every=1, patience=1, min_delta=min_delta))
        return feed(es, [(v, 1.0, True) for v in losses]), es

    d, es = run([2.45, 2.44], 0.01)  # exactly min_delta (decimal) counts as improvement
    assert d is None and es.best_loss_avg == 2.44 and es.plateau_counter == 0
    d, _ = run([2.45, 2.4401], 0.01)  # just short of it
    assert d is not None and d.step == 1 and "has not improved by 0.01" in d.reason
    d, _ = run([2.5, 2.5], 0.0)  # min_delta 0: equal is not an improvement
    assert d is not None and "has not improved over 1 checks" in d.reason
    d, _ = run([2.5, 2.4999], 0.0)
    assert d is None
    # slow creep below min_delta per check still accumulates against the reference
    es = EarlyStopping(cfg(loss_window=1, check_every=1, patience=2, min_delta=0.01))
    assert feed(es, [(v, 1.0, True) for v in (3.0, 2.994, 2.988, 2.982)]) is None
    assert es.best_loss_avg == 2.988 and es.best_loss_step == 2


def test_grad_spike_fires_with_step_range():
    es = EarlyStopping(cfg(grad_spike_threshold=1000.0, grad_spike_patience=3, monitor="none"))
    seq = healthy(812) + [(2.0, 5000.0, True), (2.0, 1.0, True)]  # isolated spike resets
    seq += healthy(0) + [(2.0, 1200.0, True), (2.0, 2000.0, True), (2.0, 3412.5, True)]
    # indices: 812 spike, 813 ok, 814, 815, 816 spikes
    d = feed(es, seq)
    assert d.rule == "grad_spike" and d.step == 816 and d.exit_code == 5
    assert d.reason == "gradient norm 3412.5 > 1000 for 3 consecutive steps (steps 814-816)"


def test_nonfinite_stop_and_counters():
    es = EarlyStopping(cfg(max_nonfinite_steps=10, monitor="none"))
    seq = healthy(5) + [(NAN, 1.0, False)] * 3 + healthy(1)  # a short streak is tolerated
    seq += [(NAN, NAN, False)] * 10
    d = feed(es, seq)
    assert d.rule == "nonfinite" and d.step == 18 and d.exit_code == 6
    assert d.reason == "10 consecutive non-finite steps (loss=nan, grad_norm=nan) at step 18"
    assert es.skipped_steps == 13 and es.consecutive_nonfinite == 10
    es = EarlyStopping(cfg(max_nonfinite_steps=2, monitor="none"))
    d = feed(es, [(INF, 3.0, True), (1.0, 3.0, False)])  # inf loss, or a trainer-flagged step
    assert d.reason == "2 consecutive non-finite steps (loss=1.0000, flagged non-finite) at step 1"
    es = EarlyStopping(cfg(grad_spike_patience=1, monitor="none"))
    assert es.observe_step(0, 2.0, None) is None and es.spike_counter == 0  # grad norm not measured
    es = EarlyStopping(cfg(max_nonfinite_steps=1, monitor="none"))
    assert feed(es, [(INF, 3.0, True)]).reason == "1 consecutive non-finite steps (loss=inf) at step 0"


def test_nonfinite_never_enters_moving_average_nor_resets_spikes():
    es = EarlyStopping(cfg(grad_spike_patience=3, monitor="none"))
    seq = [(1.0, 2000.0, True), (NAN, INF, False), (3.0, 2000.0, True), (NAN, 1.0, False)]
    assert feed(es, seq) is None
    assert es.moving_average.value == 2.0 and es.spike_counter == 2 and es.skipped_steps == 2
    d = es.observe_step(4, 1.0, 2000.0, True)
    assert d.reason == "gradient norm 2000 > 1000 for 3 consecutive steps (steps 0-4)"


def test_nothing_fires_during_warmup():
    es = EarlyStopping(cfg(warmup=100, patience=1, grad_spike_patience=1, max_nonfinite_steps=1))
    seq = []
    for i in range(100):
        seq.append([(NAN, 1.0, False), (5.0, 1e6, True), (5.0, 1.0, True)][i % 3])
    assert feed(es, seq) is None
    assert es.plateau_counter == 0 and es.best_loss_avg is None  # no checks yet
    assert es.skipped_steps == 34
    for s in range(0, 100, 10):
        assert es.observe_eval(s, 9.0) is None


def test_nonfinite_streak_from_warmup_fires_when_warmup_ends():
    es = EarlyStopping(cfg(warmup=50, max_nonfinite_steps=10, monitor="none"))
    d = feed(es, healthy(30) + [(NAN, NAN, False)] * 40)
    assert d.step == 50 and d.reason.startswith("21 consecutive non-finite steps")
    es = EarlyStopping(cfg(warmup=50, grad_spike_patience=3, monitor="none"))
    d = feed(es, healthy(45) + [(2.0, 5000.0, True)] * 10)
    assert d.step == 50 and d.reason.endswith("for 6 consecutive steps (steps 45-50)")


def test_val_loss_rule_and_best_tracking():
    es = EarlyStopping(cfg(monitor="val_loss", val_patience=2, val_min_delta=0.05, warmup=100))
    assert es.observe_eval(50, 3.0) is None and es.is_new_best and es.best_step == 50
    assert es.observe_eval(80, 3.1) is None and not es.is_new_best and es.val_counter == 0  # warmup
    assert es.observe_eval(100, 2.9) is None and es.is_new_best and es.val_counter == 0
    assert es.observe_eval(150, 2.97) is None and not es.is_new_best and es.val_counter == 1
    d = es.observe_eval(200, 2.94)  # reference is 2.9 (step 100): 2.97 and 2.94 both fail it
    assert es.is_new_best is False and d.step == 200 and d.rule == "val_plateau"
    assert d.reason == ("validation loss plateaued: 2.9400 has not improved by 0.05 over 2 evaluations "
                        "(best 2.9000 at step 100)")
    es = EarlyStopping(cfg(monitor="val_loss", val_patience=2, val_min_delta=0.05))
    es.observe_eval(100, 3.0)
    es.observe_eval(200, 2.97)  # new best checkpoint, but not a 0.05 improvement
    assert es.is_new_best and es.best_val_loss == 2.97 and es.val_counter == 1
    d = es.observe_eval(300, NAN)  # non-finite eval is never best, counts as no improvement
    assert not es.is_new_best and d == StopDecision(
        "val_plateau",
        "validation loss plateaued: nan has not improved by 0.05 over 2 evaluations (best 3.0000 at step 100)",
        300,
    )
    assert d.exit_code == 4 and es.best_val_loss == 2.97 and es.best_step == 200


def test_val_loss_exact_counts():
    es = EarlyStopping(cfg(monitor="val_loss", val_patience=3, warmup=0))
    decisions = [es.observe_eval(s, v) for s, v in [(10, 2.0), (20, 2.1), (30, 1.9), (40, 1.9), (50, 2.0), (60, 1.95)]]
    assert decisions[:5] == [None] * 5
    assert decisions[5].step == 60 and es.val_counter == 3
    assert decisions[5].reason.endswith("has not improved over 3 evaluations (best 1.9000 at step 30)")


def test_monitor_selection_and_disabled():
    # train plateau only under monitor="train_loss"; val rule only under "val_loss"
    flat = healthy(500)
    assert feed(EarlyStopping(cfg(monitor="none")), flat) is None
    assert feed(EarlyStopping(cfg(monitor="val_loss")), flat) is None
    es = EarlyStopping(cfg(monitor="train_loss"))
    assert all(es.observe_eval(s, 5.0) is None for s in range(0, 100, 10))
    assert es.best_val_loss == 5.0 and es.best_step == 0  # best is tracked regardless
    es = EarlyStopping(cfg(enabled=False, max_nonfinite_steps=1))
    assert feed(es, healthy(100) + [(NAN, NAN, False)] * 20) is None
    assert es.plateau_counter > 3 and es.consecutive_nonfinite == 20


def test_decision_is_sticky_and_steps_must_increase():
    es = EarlyStopping(cfg(max_nonfinite_steps=1, monitor="none"))
    d = es.observe_step(0, NAN, 1.0, False)
    assert es.observe_step(1, 1.0, 1.0, True) is d and es.last_step == 0
    assert es.observe_eval(2, 1.0) is d and es.is_new_best
    es = EarlyStopping(cfg())
    es.observe_step(5, 1.0, 1.0)
    with pytest.raises(ValueError, match="steps must increase"):
        es.observe_step(5, 1.0, 1.0)


def test_the_spec_section_drives_it_and_counters():
    spec = build_spec(None, {"early_stopping.monitor": "none", "early_stopping.patience": 2,
                             "early_stopping.grad_spike_threshold": 10.0,
                             "early_stopping.grad_spike_patience": 2,
                             "early_stopping.max_nonfinite_steps": 3,
                             "early_stopping.warmup": 7})
    es = EarlyStopping(spec.early_stopping)
    assert es.config is spec.early_stopping
    feed(es, [(1.0, 50.0, True), (NAN, 1.0, False)])
    assert es.counters() == {"plateau_counter": 0, "val_counter": 0, "spike_counter": 1,
                             "consecutive_nonfinite": 1, "skipped_steps": 1}


def test_the_section_is_validated_where_the_spec_is():
    assert EarlyStoppingSpec().monitor == "train_loss" and EarlyStoppingSpec().warmup == 50
    for key, bad in (("monitor", "acc"), ("patience", 0), ("check_every", 0),
                     ("min_delta", -1.0)):
        with pytest.raises(SpecError, match=f"early_stopping.{key}"):
            build_spec(None, {f"early_stopping.{key}": bad})


# ------------------------------------------------------------ resume
def _scenario(n=900, seed=3):
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        loss = 2.0 * math.exp(-i / 100) + 1.0 + rng.gauss(0, 0.02)
        grad = rng.choice([1.0, 2.0, 1500.0]) if i > 300 else 1.0
        finite = rng.random() > 0.1
        out.append((loss if finite else NAN, grad if finite else INF, finite))
    return out


@pytest.mark.parametrize("split", [1, 137, 400, 650, 749, 800])
def test_state_dict_round_trip_matches_uninterrupted(split):
    conf = EarlyStoppingSpec(warmup=50, check_every=50, loss_window=50, patience=3, min_delta=0.01,
                               grad_spike_patience=5, max_nonfinite_steps=4, monitor="train_loss")
    seq = _scenario()

    def trace(es, items, start):
        out = []
        for i, (l, g, f) in enumerate(items, start):
            out.append((es.observe_step(i, l, g, f), es.plateau_counter, es.spike_counter,
                        es.consecutive_nonfinite, es.skipped_steps, es.moving_average.value))
            if i % 100 == 0:
                out.append((es.observe_eval(i, 2.0 - i / 1000), es.is_new_best, es.best_step))
        return out

    full = trace(EarlyStopping(conf), seq, 0)
    first = EarlyStopping(conf)
    head = trace(first, seq[:split], 0)
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # strict JSON
    resumed = EarlyStopping(conf)
    resumed.load_state_dict(state)
    assert head + trace(resumed, seq[split:], split) == full
    # the scenario exercises skips and spikes, then stops on the plateau rule at step 750
    stop = next(t[0] for t in full if t[0] is not None)
    assert stop.rule == "plateau" and stop.step == 750
    assert max(t[2] for t in full if len(t) == 6) == 4 and full[-1][4] == 86


# ------------------------------------------------------------ throughput
def test_throughput_rates_and_eta():
    tm = ThroughputMeter(window=4)
    assert tm.steps_per_second is None and tm.eta_seconds(0, 100) is None
    t = 100.0
    for step in range(1, 11):
        t += 0.5 if step <= 6 else 2.0  # slows down: the window only sees the recent rate
        tm.update(step, t, tokens=1000)
    # last 5 records: steps 6..10, times 103.0, 105, 107, 109, 111
    assert tm.steps_per_second == pytest.approx(4 / 8.0)
    assert tm.tokens_per_second == pytest.approx(4000 / 8.0)
    assert tm.eta_seconds(10, 110) == pytest.approx(200.0)
    assert tm.eta_seconds(110, 110) == 0.0
    tm.update(3, 50.0, 10)  # clock or step went backwards: fresh window
    assert tm.steps_per_second is None
    tm.update(4, 50.0, 10)  # zero elapsed time: no rate rather than a division by zero
    assert tm.steps_per_second is None and tm.eta_seconds(4, 10) is None
