"""Tests for mlx_tune.training.schedules: closed forms, edge cases, and torch parity."""

from __future__ import annotations

import math
import pickle

import pytest

from mlx_tune.training.schedules import SCHEDULES, build_schedule, resolve_warmup_steps

LR = 2e-4


def close(a: float, b: float, rel: float = 1e-12, abs_: float = 1e-18) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


# --------------------------------------------------------------- closed forms
def test_schedules_tuple():
    assert SCHEDULES == ("cosine", "cosine_restarts", "onecycle", "linear", "constant")


@pytest.mark.parametrize("name", ["cosine", "cosine_restarts", "linear", "constant"])
def test_warmup_convention(name):
    lr = build_schedule(name, learning_rate=1.0, total_steps=100, warmup_steps=4, min_lr=0.1)
    # lr(step) = learning_rate * (step + 1) / warmup_steps: first update not at 0
    assert [lr(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(4) == 1.0  # decay phase starts from the peak


def test_cosine_closed_form():
    lr = build_schedule("cosine", learning_rate=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert lr(10) == 1.0
    assert close(lr(60), 0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert close(lr(35), 0.1 + 0.9 * (1 + math.cos(math.pi * 0.25)) / 2)
    assert close(lr(85), 0.1 + 0.9 * (1 + math.cos(math.pi * 0.75)) / 2)
    assert close(lr(110), 0.1)
    assert lr(109) > 0.1
    assert lr(111) == lr(5000) == lr(110)  # holds the end value, no crash


def test_cosine_no_warmup_and_tiny_runs():
    lr = build_schedule("cosine", learning_rate=LR, total_steps=1)
    assert lr(0) == LR and lr(1) == 0.0 and lr(7) == 0.0
    lr = build_schedule("cosine", learning_rate=LR, total_steps=2)
    assert lr(0) == LR and close(lr(1), LR / 2) and lr(2) == 0.0
    # warmup covering the whole run: warm up, then sit at min_lr
    lr = build_schedule("cosine", learning_rate=1.0, total_steps=3, warmup_steps=3, min_lr=0.5)
    assert [lr(s) for s in range(5)] == [1 / 3, 2 / 3, 1.0, 0.5, 0.5]


def test_linear_closed_form():
    lr = build_schedule("linear", learning_rate=1.0, total_steps=12, warmup_steps=2, min_lr=0.0)
    assert [lr(s) for s in range(2)] == [0.5, 1.0]
    for s in range(2, 13):
        assert close(lr(s), 1.0 - (s - 2) / 10)
    assert lr(12) == 0.0 and lr(100) == 0.0
    lr = build_schedule("linear", learning_rate=1.0, total_steps=10, min_lr=0.5)
    assert lr(0) == 1.0 and close(lr(5), 0.75) and lr(10) == 0.5 and lr(11) == 0.5


def test_constant():
    lr = build_schedule("constant", learning_rate=LR, total_steps=10, warmup_steps=0)
    assert {lr(s) for s in range(20)} == {LR}
    lr = build_schedule("constant", learning_rate=1.0, total_steps=10, warmup_ratio=0.2)
    assert [lr(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_cosine_restarts_closed_form():
    lr = build_schedule("cosine_restarts", learning_rate=1.0, total_steps=100, t_0=10, min_lr=0.0)
    for s in (0, 10, 20, 90):
        assert lr(s) == 1.0  # restart
    assert close(lr(5), 0.5) and close(lr(15), 0.5)
    assert lr(99) == lr(100) == lr(1000)  # holds the last scheduled value
    # t_mult = 2: cycles of 4, 8, 16 after a 3-step warmup
    lr = build_schedule("cosine_restarts", learning_rate=1.0, total_steps=40, warmup_steps=3,
                        t_0=4, t_mult=2, min_lr=0.2)
    assert [lr(s) for s in range(3)] == [1 / 3, 2 / 3, 1.0]
    starts = [3, 7, 15, 31]
    for st in starts:
        assert lr(st) == 1.0
    assert close(lr(3 + 2), 0.2 + 0.8 * 0.5)     # middle of 4-cycle
    assert close(lr(7 + 4), 0.2 + 0.8 * 0.5)     # middle of 8-cycle
    assert close(lr(15 + 12), 0.2 + 0.8 * (1 + math.cos(math.pi * 12 / 16)) / 2)
    # default t_0: one cycle over the decay phase == plain cosine before the end
    a = build_schedule("cosine_restarts", learning_rate=1.0, total_steps=50, warmup_steps=5)
    b = build_schedule("cosine", learning_rate=1.0, total_steps=50, warmup_steps=5)
    assert all(close(a(s), b(s)) for s in range(50))


def test_onecycle_closed_form():
    lr = build_schedule("onecycle", learning_rate=1.0, total_steps=101, pct_start=0.3,
                        warmup_steps=7)  # warmup is ignored for onecycle
    assert close(lr(0), 1.0 / 25)
    # phase 1 ends at float(0.3*101) - 1 = 29.3, so the peak itself falls between steps
    e1 = 0.3 * 101 - 1
    assert close(lr(29), 1.0 + (0.04 - 1.0) / 2 * (math.cos(math.pi * 29 / e1) + 1))
    assert close(lr(30), 0.04e-4 + (1.0 - 0.04e-4) / 2 * (math.cos(math.pi * (30 - e1) / (100 - e1)) + 1))
    assert lr(29) < 1.0 and lr(30) < 1.0 and lr(31) < lr(30)
    assert close(lr(100), 1.0 / 25 / 1e4)
    assert lr(100) == lr(101) == lr(10**6)
    lin = build_schedule("onecycle", learning_rate=9.0, max_lr=1.0, total_steps=11, pct_start=0.5,
                         anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0)
    # phase 1: steps 0..4.5 from 0.1 to 1.0 linearly; phase 2: 4.5..10 to 0.001
    assert close(lin(0), 0.1) and close(lin(4), 0.1 + 0.9 * 4 / 4.5)
    assert close(lin(10), 0.001) and close(lin(5), 1.0 + (0.001 - 1.0) * 0.5 / 5.5)


def test_onecycle_degenerate_phases_do_not_crash():
    # pct_start * total_steps == 1 makes torch divide 0/0; we return the phase end.
    lr = build_schedule("onecycle", learning_rate=1.0, total_steps=10, pct_start=0.1)
    assert lr(0) == 1.0 and lr(9) == pytest.approx(1.0 / 25 / 1e4)
    lr = build_schedule("onecycle", learning_rate=1.0, total_steps=1, pct_start=1.0)
    assert lr(0) == 1.0
    lr = build_schedule("onecycle", learning_rate=1.0, total_steps=1)
    assert lr(0) == pytest.approx(1.0 / 25 / 1e4)


def test_warmup_ratio():
    assert resolve_warmup_steps(1000, warmup_ratio=0.05) == 50
    assert resolve_warmup_steps(30, warmup_ratio=0.05) == 2  # round(1.5) == 2
    assert resolve_warmup_steps(10, warmup_ratio=0.25) == 2  # round(2.5) == 2 (banker's)
    lr = build_schedule("linear", learning_rate=1.0, total_steps=100, warmup_ratio=0.1)
    assert lr.warmup_steps == 10 and lr(9) == 1.0 and lr(0) == 0.1
    with pytest.raises(ValueError, match="not both"):
        build_schedule("cosine", learning_rate=1.0, total_steps=100, warmup_steps=5, warmup_ratio=0.1)
    # warmup_steps=0 explicitly plus a ratio is fine (configs often carry both keys)
    assert build_schedule("cosine", learning_rate=1.0, total_steps=100, warmup_steps=0,
                          warmup_ratio=0.1).warmup_steps == 10


@pytest.mark.parametrize("kwargs", [
    dict(name="nope"),
    dict(total_steps=0),
    dict(total_steps=2.5),
    dict(learning_rate=0.0),
    dict(learning_rate=float("nan")),
    dict(warmup_steps=-1),
    dict(warmup_steps=101),
    dict(warmup_ratio=1.5),
    dict(min_lr=2.0),
    dict(min_lr=-1.0),
    dict(min_lr=None),
    dict(name="cosine_restarts", t_0=0),
    dict(name="cosine_restarts", t_mult=0),
    dict(name="onecycle", pct_start=1.5),
    dict(name="onecycle", anneal_strategy="exp"),
    dict(name="onecycle", max_lr=-1.0),
])
def test_validation(kwargs):
    args = dict(name="cosine", learning_rate=1.0, total_steps=100) | kwargs
    with pytest.raises(ValueError):
        build_schedule(args.pop("name"), **args)


def test_negative_step_rejected():
    with pytest.raises(ValueError):
        build_schedule("cosine", learning_rate=1.0, total_steps=10)(-1)


@pytest.mark.parametrize("name", SCHEDULES)
def test_pure_and_resumable(name):
    lr = build_schedule(name, learning_rate=LR, total_steps=57, warmup_steps=5, t_0=9, t_mult=2, min_lr=1e-6)
    full = [lr(s) for s in range(70)]
    # a "resumed" schedule rebuilt from the same config continues the curve
    resumed = pickle.loads(pickle.dumps(lr))
    assert [resumed(s) for s in range(30, 70)] == full[30:]
    assert [lr(s) for s in reversed(range(70))] == full[::-1]
    assert all(math.isfinite(v) and v >= 0 for v in full)


# --------------------------------------------------------------- torch parity
def _torch_lrs(make_scheduler, steps: int, base_lr: float) -> list[float]:
    """Learning rate used by each of `steps` optimizer updates under torch."""
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr)
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _assert_match(ours, theirs, rel=1e-9, abs_=1e-15):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=abs_), f"step {i}: ours {a!r} torch {b!r}"


@pytest.mark.parametrize("total,eta_min", [(1, 0.0), (10, 0.0), (100, 0.0), (257, 3e-6)])
def test_torch_cosine(total, eta_min):
    sched = pytest.importorskip("torch.optim.lr_scheduler")
    lr = build_schedule("cosine", learning_rate=LR, total_steps=total, min_lr=eta_min)
    theirs = _torch_lrs(lambda o: sched.CosineAnnealingLR(o, T_max=total, eta_min=eta_min), total + 1, LR)
    # torch's CosineAnnealingLR is recursive (accumulates ~1e-14 rounding), hence isclose
    _assert_match([lr(s) for s in range(total + 1)], theirs, rel=1e-9, abs_=1e-15)


@pytest.mark.parametrize("t_0,t_mult,eta_min,total", [
    (10, 1, 0.0, 95), (7, 1, 1e-5, 60), (5, 2, 0.0, 160), (3, 2, 2e-5, 200), (4, 3, 0.0, 170),
])
def test_torch_cosine_warm_restarts(t_0, t_mult, eta_min, total):
    sched = pytest.importorskip("torch.optim.lr_scheduler")
    lr = build_schedule("cosine_restarts", learning_rate=LR, total_steps=total, t_0=t_0,
                        t_mult=t_mult, min_lr=eta_min)
    theirs = _torch_lrs(
        lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=t_0, T_mult=t_mult, eta_min=eta_min), total, LR)
    _assert_match([lr(s) for s in range(total)], theirs, rel=1e-12)


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("pct_start", [0.05, 0.1, 0.25, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("total", [10, 97, 1000])
def test_torch_onecycle(strategy, pct_start, total):
    sched = pytest.importorskip("torch.optim.lr_scheduler")
    if pct_start * total == 1:
        pytest.skip("torch divides 0/0 in this configuration")
    lr = build_schedule("onecycle", learning_rate=1e-3, max_lr=3e-3, total_steps=total, pct_start=pct_start,
                        anneal_strategy=strategy, div_factor=20.0, final_div_factor=500.0)
    theirs = _torch_lrs(
        lambda o: sched.OneCycleLR(o, max_lr=3e-3, total_steps=total, pct_start=pct_start,
                                   anneal_strategy=strategy, div_factor=20.0, final_div_factor=500.0,
                                   cycle_momentum=False), total, 1e-3)
    # same arithmetic as torch, so bit-identical
    assert [lr(s) for s in range(total)] == theirs


def test_torch_onecycle_defaults():
    sched = pytest.importorskip("torch.optim.lr_scheduler")
    lr = build_schedule("onecycle", learning_rate=LR, total_steps=300)
    theirs = _torch_lrs(lambda o: sched.OneCycleLR(o, max_lr=LR, total_steps=300, cycle_momentum=False), 300, LR)
    assert [lr(s) for s in range(300)] == theirs


@pytest.mark.parametrize("total,warmup,min_lr", [(50, 0, 0.0), (50, 0, 2e-5), (80, 8, 0.0), (80, 2, 1e-5)])
def test_torch_linear(total, warmup, min_lr):
    sched = pytest.importorskip("torch.optim.lr_scheduler")
    lr = build_schedule("linear", learning_rate=LR, total_steps=total, warmup_steps=warmup, min_lr=min_lr)

    def make(o):
        # warmup (step+1)/W == LinearLR(1/W -> 1 over W-1 iters); decay 1 -> min_lr/lr over total-W iters
        decay = sched.LinearLR(o, start_factor=1.0, end_factor=min_lr / LR, total_iters=total - warmup)
        if warmup == 0:
            return decay
        warm = sched.LinearLR(o, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
        return sched.SequentialLR(o, [warm, decay], milestones=[warmup])

    theirs = _torch_lrs(make, total + 5, LR)
    _assert_match([lr(s) for s in range(total + 5)], theirs, rel=1e-9, abs_=1e-15)


@pytest.mark.parametrize("total,warmup,min_lr", [(100, 10, 0.0), (100, 10, 1e-5), (64, 3, 0.0), (30, 2, 5e-6)])
def test_torch_warmup_cosine_sequential(total, warmup, min_lr):
    sched = pytest.importorskip("torch.optim.lr_scheduler")
    lr = build_schedule("cosine", learning_rate=LR, total_steps=total, warmup_steps=warmup, min_lr=min_lr)

    def make(o):
        warm = sched.LinearLR(o, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
        cos = sched.CosineAnnealingLR(o, T_max=total - warmup, eta_min=min_lr)
        return sched.SequentialLR(o, [warm, cos], milestones=[warmup])

    theirs = _torch_lrs(make, total + 1, LR)
    _assert_match([lr(s) for s in range(total + 1)], theirs, rel=1e-9, abs_=1e-15)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_torch_warmup_lambda(name):
    sched = pytest.importorskip("torch.optim.lr_scheduler")
    total, warmup, min_lr = 120, 12, 1e-5

    def factor(step):  # independent statement of the documented formulas
        if step < warmup:
            return (step + 1) / warmup
        p = min(step - warmup, total - warmup) / (total - warmup)
        end = min_lr / LR
        if name == "constant":
            return 1.0
        if name == "linear":
            return end + (1 - end) * (1 - p)
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * p))

    lr = build_schedule(name, learning_rate=LR, total_steps=total, warmup_steps=warmup, min_lr=min_lr)
    theirs = _torch_lrs(lambda o: sched.LambdaLR(o, factor), total + 10, LR)
    _assert_match([lr(s) for s in range(total + 10)], theirs, rel=1e-12)
