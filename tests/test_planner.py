"""The planner: optimal for its model (against brute force), and its plans fit
their budgets when measured."""

import copy
import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memfit
from memfit import MemfitError, models
from memfit.core.schedule import Plan
from memfit.core.strategies import KEEP, MODES, OFFLOAD, RECOMPUTE, Unit
from memfit.planning.planner import _candidates, solve
from memfit.planning.profiling import HOST_MODES, Profile
from memfit.tools.verification import verify


def all_plans(n, modes=HOST_MODES):
    """Every split of n blocks into consecutive units; single blocks in any
    mode, longer units recomputed as segments."""
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        spans = list(zip(bounds, bounds[1:]))
        choices = [modes if b - a == 1 else (RECOMPUTE,) for a, b in spans]
        for chosen in itertools.product(*choices):
            yield [Unit(a, b, m) for (a, b), m in zip(spans, chosen)]


def modelled(prof, units, kind):
    """Peak and cost of `units` under the planner's peak model."""
    cands = {(c.start, c.stop, c.mode): c for c in _candidates(prof, kind)}
    kept, peak, cost = 0.0, prof.tail, 0.0
    for u in units:
        c = cands[(u.start, u.stop, u.mode)]
        peak = max(peak, prof.start + kept + c.need)
        kept += c.kept
        cost += c.cost
    return max(peak, prof.start + kept + prof.head), cost


@st.composite
def profiles(draw, modes=HOST_MODES):
    n = draw(st.integers(1, 5 if modes == HOST_MODES else 4))
    ints = st.integers(0, 1000)
    per_mode = lambda: {m: [draw(ints) for _ in range(n)] for m in MODES}  # noqa: E731
    costs = {
        kind: {m: [0.0 if m == KEEP else draw(st.floats(0, 100)) for _ in range(n)] for m in modes}
        for kind in ("flops", "time")
    }
    costs["flops"][OFFLOAD] = [float("inf")] * n
    return Profile(
        names=[f"b{i}" for i in range(n)],
        device="cuda" if OFFLOAD in modes else "cpu",
        modes=modes,
        step_time_s=1.0,
        baseline_peak_bytes=10**5,
        static_bytes=0,
        start=draw(st.integers(0, 500)),
        head=draw(ints),
        tail=draw(st.integers(0, 3000)),
        other=[draw(ints) for _ in range(n)],
        kept=per_mode(),
        work=per_mode(),
        transient=per_mode(),
        costs=costs,
        recomputed={m: [0] * n for m in modes},
        step_flops=1000,
    )


def check_optimal(prof, budget, kind, modes):
    scored = [(modelled(prof, u, kind), u) for u in all_plans(len(prof.names), modes)]
    feasible = [cost for (peak, cost), _ in scored if peak <= budget]
    bins = 100_000
    result = solve(prof, budget, kind, bins=bins)
    # the DP rounds kept bytes up: it may only miss plans within the rounding of the budget
    slack = (budget - prof.start) / bins * len(prof.names)
    if result is None:
        assert not [c for (p, c), _ in scored if p <= budget - slack]
        return
    units, cost = result
    peak, model_cost = modelled(prof, units, kind)
    assert peak <= budget and model_cost == pytest.approx(cost)
    assert cost >= min(feasible) - 1e-9
    # optimal among the plans that fit with the rounding's slack to spare
    assert cost <= min([c for (p, c), _ in scored if p <= budget - slack] or [cost]) + 1e-9


@settings(max_examples=80, deadline=None)
@given(profiles(), st.integers(500, 12000))
def test_dp_is_optimal_against_brute_force(prof, budget):
    check_optimal(prof, budget, "flops", HOST_MODES)


@settings(max_examples=50, deadline=None)
@given(profiles(MODES), st.integers(500, 12000))
def test_dp_with_offload_and_time_cost_is_optimal(prof, budget):
    """A CUDA profile with offload as a sixth mode, under the time cost."""
    check_optimal(prof, budget, "time", MODES)


@pytest.mark.parametrize("name, batch_size", [("gpt", 16), ("resnet-se", 16), ("mlp", 256)])
def test_plans_fit_their_budgets_and_predict_the_measured_peak(name, batch_size):
    """(mlp at batch 16: parameters are its whole peak, and no budget below 100% is reachable.)"""
    model, batch, loss_fn = models.load(name, size="tiny", batch_size=batch_size)
    checked = []
    for budget in ("60%", "75%", "90%"):
        try:
            p = memfit.plan(model, batch, loss_fn, budget, cost="flops")
        except MemfitError as e:
            assert "below the smallest peak" in str(e) and budget == "60%", budget
            continue
        checked.append(budget)
        report = verify(model, batch, loss_fn, p, steps=1)
        assert report["passed"] and report["grads_bitwise_equal"]
        measured = report["checkpointed"]["peak_bytes"]
        assert measured <= p.budget_bytes
        assert measured == p.predicted_peak_bytes  # CPU: the simulation is exact
    assert checked[-2:] == ["75%", "90%"], checked


def test_plan_beats_uniform_strategies_that_fit():
    """At 60% of the plain peak of the default GPT, the plan recomputes less
    than any uniform strategy that fits the same budget (FLOP cost)."""
    model, batch, loss_fn = models.load("gpt", size="tiny", batch_size=16)
    p = memfit.plan(model, batch, loss_fn, "60%", cost="flops")
    from memfit.core.measurement import measure
    from memfit.tools.bench import UNIFORM

    base = measure(model, batch, loss_fn, "none", timed_steps=0)
    planned = measure(model, batch, loss_fn, p, timed_steps=0)
    fitting = 0
    for s in UNIFORM:
        m = measure(model, batch, loss_fn, s, timed_steps=0)
        if m["peak_bytes"] <= p.budget_bytes:
            fitting += 1
            assert planned["flops"] <= m["flops"], s
    assert fitting and planned["flops"] < base["flops"] * 1.33


@pytest.mark.parametrize("uniform", ["blocks", "sqrt"])
def test_a_budget_a_uniform_strategy_just_meets_is_planned(uniform):
    """At exactly the simulated peak of a uniform strategy, where the DP's rounded-up
    bytes may miss it, the plan still fits and costs no more than that strategy."""
    from memfit.core.measurement import measure
    from memfit.planning.simulation import simulate

    model, batch, loss_fn = models.load("resnet-se", size="tiny", batch_size=16)  # blocks: the DP alone misses it
    budget = simulate(model, batch, loss_fn, uniform).peak_bytes
    p = memfit.plan(model, batch, loss_fn, budget, cost="flops")
    assert p.predicted_peak_bytes <= budget
    assert (
        measure(model, batch, loss_fn, p, timed_steps=0)["flops"]
        <= measure(model, batch, loss_fn, uniform, timed_steps=0)["flops"]
    )


def test_a_time_plan_is_never_beaten_by_a_fitting_uniform_strategy(monkeypatch):
    """Under one time model (fixed here, so the test is deterministic), no
    uniform strategy that fits the budget costs less predicted time than the
    plan, and the plan is never beaten by one in both time and FLOPs."""
    from memfit.core import strategies
    from memfit.planning import profiling, simulation
    from memfit.planning.planner import UNIFORM_FALLBACKS
    from memfit.planning.timemodel import TimeModel

    fixed = TimeModel("cpu", per_flop=1e-11, per_byte=2e-11, per_op=3e-6, spread=0.0, error=0.0)
    monkeypatch.setattr(profiling, "calibrate", lambda device: fixed)
    model, batch, loss_fn = models.load("gpt", size="tiny", batch_size=16)
    prof = profiling.profile(model, batch, loss_fn, cost="time")
    uniform = {}
    for name in UNIFORM_FALLBACKS:
        units = strategies.units_of(name, prof.chain_sizes)
        uniform[name] = (
            simulation.simulate(model, batch, loss_fn, name).peak_bytes,
            *[sum(prof.cost(u.mode, i, k) for u in units for i in range(u.start, u.stop)) for k in ("time", "flops")],
        )
    fitting = []
    for budget in ("50%", "65%", "80%"):
        p = memfit.plan(model, batch, loss_fn, budget, cost="time")
        time_cost, flop_cost = [
            sum(prof.cost(u.mode, i, k) for u in p.units for i in range(u.start, u.stop)) for k in ("time", "flops")
        ]
        assert time_cost == pytest.approx(p.predicted_overhead * prof.step_time_s)
        for name, (peak, t, f) in uniform.items():
            if peak <= p.budget_bytes:
                fitting.append((budget, name))
                assert time_cost <= t * (1 + 1e-9), (budget, name)
                assert not (t < time_cost and f < flop_cost), (budget, name)
    assert {b for b, _ in fitting} == {"50%", "65%", "80%"}, fitting  # every budget was compared with something


def test_infeasible_budget_states_the_minimum():
    model, batch, loss_fn = models.load("gpt", size="tiny")
    with pytest.raises(MemfitError, match=r"below the smallest peak .* about [\d.]+ (KiB|MiB)"):
        memfit.plan(model, batch, loss_fn, "5%", cost="flops")


def test_plan_json_round_trip_and_apply_to_a_fresh_model(tmp_path):
    model, batch, loss_fn = models.load("resnet-se", size="tiny", batch_size=8)
    p = memfit.plan(model, batch, loss_fn, "85%", cost="flops")
    assert any(b.mode != KEEP for b in p.blocks)
    path = tmp_path / "plan.json"
    path.write_text(p.to_json())
    loaded = Plan.load(path)
    assert loaded == p and loaded.units == p.units
    fresh, _, _ = models.load("resnet-se", size="tiny", seed=3)
    memfit.apply(fresh, loaded)
    assert [mode for _, mode in memfit.wrapped_blocks(fresh)] == [b.mode for b in p.blocks if b.mode != KEEP]
    other, _, _ = models.load("gpt", size="tiny")
    with pytest.raises(MemfitError, match="this plan was made for a model with 3 blocks"):
        memfit.apply(other, loaded)
    with pytest.raises(MemfitError, match="not a memfit plan"):
        Plan.from_json('{"blocks": 3}')


def test_plans_are_cached_by_shape(monkeypatch):
    import memfit.planning.planner as planner

    calls = []
    real = planner.profile
    monkeypatch.setattr(planner, "profile", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, (idx, targets), loss_fn = models.load("gpt", size="tiny", batch_size=4)
    first = memfit.plan(model, (idx, targets), loss_fn, "95%", cost="flops")
    assert memfit.plan(model, (idx, targets), loss_fn, "95%", cost="flops") is first and len(calls) == 1
    shorter = (idx[:, :16].contiguous(), targets[:, :16].contiguous())  # a new sequence length: plan once more
    memfit.plan(model, shorter, loss_fn, "95%", cost="flops")
    memfit.plan(model, shorter, loss_fn, "95%", cost="flops")
    assert len(calls) == 2


def test_apply_with_a_budget_plans_and_applies():
    model, batch, loss_fn = models.load("gpt", size="tiny")
    reference = copy.deepcopy(model)
    memfit.apply(model, budget="80%", batch=batch, loss_fn=loss_fn, cost="flops")
    assert memfit.wrapped_blocks(model)
    torch.manual_seed(0)
    loss_fn(model, batch).backward()
    torch.manual_seed(0)
    loss_fn(reference, batch).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_cli_plan_and_bench(tmp_path, cli):
    plan_path, verified = tmp_path / "plan.json", tmp_path / "verify.json"
    r = cli("plan", "--model", "gpt", "--size", "tiny", "--budget", "60%", "--json", str(plan_path))  # time cost
    assert r.returncode == 0, r.stderr
    assert "predicted" in r.stdout and "fits" in r.stdout and "transformer.h.0" in r.stdout
    assert "slowdown (interleaved with the plain step)" in r.stdout
    assert "step time (time model)" in r.stdout and "under a policy" in r.stdout
    data = json.loads(plan_path.read_text())
    assert data["measured_peak_bytes"] == data["predicted_peak_bytes"]
    r = cli(
        "verify",
        "--model",
        "gpt",
        "--size",
        "tiny",
        "--strategy",
        f"plan:{plan_path}",
        "--steps",
        "1",
        "--json",
        str(verified),
    )
    assert r.returncode == 0 and "predicted (time model)" in r.stdout, r.stderr
    assert json.loads(verified.read_text())["checkpointed"]["predicted_slowdown"] > 0
    r = cli("verify", "--model", "resnet-se", "--strategy", f"plan:{plan_path}", "--steps", "1")
    assert r.returncode == 2 and "this plan was made for a model" in r.stderr

    bench_json, png = tmp_path / "bench.json", tmp_path / "pareto.png"
    r = cli(
        "bench",
        "--model",
        "mlp",
        "--size",
        "tiny",
        "--budgets",
        "50,100",
        "--cost",
        "flops",
        "--json",
        str(bench_json),
        "--plot",
        str(png),
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(bench_json.read_text())["rows"]
    assert {
        "none",
        "blocks",
        "every:2",
        "every:3",
        "sqrt",
        "selective",
        "scores",
        "pointwise",
        "plan:50%",
        "plan:100%",
    } == {r["strategy"] for r in rows}
    for row in rows:
        assert {
            "strategy",
            "budget_bytes",
            "predicted_peak_bytes",
            "peak_bytes",
            "step_time_s",
            "recompute_flops",
        } <= set(row)
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "--budget", "0"], "must be positive"),
        (["plan", "--budget", "-5GiB"], "must be positive"),
        (["plan", "--budget", "150%"], "at most 100%"),
        (["plan", "--budget", "abc"], "cannot read budget"),
        (["plan", "--model", "gpt", "--size", "tiny", "--budget", "3%", "--cost", "flops"], "below the smallest peak"),
        (["bench", "--budgets", "20,x"], "--budgets"),
        (["verify", "--strategy", "plan:missing.json"], "cannot read plan"),
        (["verify", "--model", "mlp", "--size", "tiny", "--strategy", "offload"], "on cpu it saves nothing"),
    ],
)
def test_cli_bad_input(args, message, capsys):
    """In this process, as tests/test_cli.py does."""
    from memfit.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


class TwoFaced(torch.nn.Module):
    """Takes another path on fake tensors, as transformers does for a causal
    LM without attention_mask: it keeps a wider mask for backward."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            *[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()) for _ in range(4)]
        )

    def forward(self, x):
        from torch._subclasses.fake_tensor import FakeTensor

        width = 512 if isinstance(x, FakeTensor) else 16
        return (self.layers(x) * torch.ones(x.shape[0], width)[:, :16]).pow(2).mean()


class DataDependent(TwoFaced):
    """Reads a value in its forward, which fake tensors cannot do."""

    def forward(self, x):
        if x.abs().max() > 100:
            x = x / 100
        return self.layers(x).pow(2).mean()


@pytest.mark.parametrize("model, why", [(TwoFaced, "another path"), (DataDependent, "cannot run")])
def test_a_step_the_simulation_gets_wrong_is_planned_on_real_steps(model, why):
    torch.manual_seed(0)
    model, batch = model(), torch.randn(32, 16)
    plan = memfit.plan(model, batch, lambda m, b: m(b), "90%", cost="flops")
    assert plan.sources["memory"].startswith("measured") and why in plan.sources["memory"]
    report = verify(model, batch, lambda m, b: m(b), plan, steps=1)
    assert report["baseline"]["peak_bytes"] == plan.baseline_peak_bytes
    assert report["checkpointed"]["peak_bytes"] == plan.predicted_peak_bytes
    assert f"memory: {plan.sources['memory']}" in str(plan)


def test_a_cached_plan_is_not_reused_for_a_model_whose_memory_changed():
    """NOTE [plan cache]: the same model object in bf16 (or a copy, or with another loss) is planned again, and
    the new plan predicts the bf16 step's measured peak; the same call again is served from the cache."""
    from memfit.core.measurement import measure

    model, batch, loss_fn = models.load("gpt", size="tiny", batch_size=16)
    first = memfit.plan(model, batch, loss_fn, "80%", cost="flops")
    assert memfit.plan(model, batch, loss_fn, "80%", cost="flops") is first
    assert memfit.plan(copy.deepcopy(model), batch, loss_fn, "80%", cost="flops") is not first
    assert memfit.plan(model, batch, lambda m, b: loss_fn(m, b), "80%", cost="flops") is not first
    model.to(torch.bfloat16)
    second = memfit.plan(model, batch, loss_fn, "80%", cost="flops")
    assert second is not first and second.predicted_peak_bytes < first.predicted_peak_bytes
    measured = measure(model, batch, loss_fn, second, timed_steps=0)["peak_bytes"]
    assert measured == second.predicted_peak_bytes <= second.budget_bytes
