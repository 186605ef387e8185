"""memfit.core.schedule: every spelling of a schedule, read by one parser, means the same everywhere."""

import pytest

import memfit
from memfit import MemfitError, models
from memfit.attribution import choose_checkpointing
from memfit.core import schedule
from memfit.core.measurement import measure
from memfit.core.schedule import Budget, Schedule
from memfit.core.strategies import Unit
from memfit.core.wrapping import applied_strategy
from memfit.integrations import Session
from memfit.train.config import resolve


@pytest.mark.parametrize(
    "text, expected",
    [
        ("20GiB", 20 * 2**30),
        ("800MB", 800 * 10**6),
        ("1.5 GB", 1_500_000_000),
        ("4096", 4096),
        ("60%", 600),
        ("100%", 1000),
        (123, 123),
    ],
)
def test_budgets(text, expected):
    assert Budget.parse(text).bytes(baseline_peak=1000) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("0", "must be positive"),
        ("-5GiB", "must be positive"),
        ("150%", "at most 100%"),
        ("0%", "above 0%"),
        ("abc", "cannot read budget"),
        ("12 parsecs", "cannot read budget"),
    ],
)
def test_bad_budgets(text, message):
    with pytest.raises(MemfitError, match=message):
        Budget.parse(text)


def test_a_share_needs_the_plain_peak_and_auto_asks_the_device(monkeypatch):
    with pytest.raises(MemfitError, match="share of the plain run's peak"):
        Budget.parse("60%").bytes()
    asked = []
    monkeypatch.setattr(schedule, "available_bytes", lambda device: asked.append(device.type) or 7)
    assert Budget.parse("auto").bytes(device="cpu") == 7 and asked == ["cpu"]


@pytest.mark.parametrize(
    "spellings, expected",
    [
        ((True, 1, "true", "On", "yes", "1", "blocks", " BLOCKS "), Schedule("blocks")),
        ((False, 0, "false", "off", "no", "0", "none"), Schedule("none")),
        (("plan:60%", "budget:60%", " Plan: 60% "), Schedule(budget=Budget("60%", fraction=0.6))),
        (("every:2", "EVERY:2"), Schedule("every:2")),
        (
            ({"encoder.layers": True, "decoder.layers": "off"},),
            Schedule({"encoder.layers": "blocks", "decoder.layers": "none"}),
        ),
    ],
)
def test_every_spelling_reads_as_one_value(spellings, expected):
    for s in spellings:
        assert schedule.parse(s) == expected, s


@pytest.mark.parametrize(
    "value, message",
    [
        ("everything", "unknown strategy"),
        ("every:0", "positive integer"),
        ("blocks:2", "takes no argument"),
        (2, "not understood"),
        (0.5, "not understood"),
        (None, "not understood"),
        (object(), "not understood"),
        ({"encoder.layers": "plan:60%"}, "one budget covers all chains"),
        ({}, "maps chains to strategies"),
        ("budget:p.json", "write it plan:p.json"),
        ("plan:missing.json", "cannot read plan missing.json"),
        ("plan:lots", "cannot read budget"),
    ],
)
def test_bad_schedules_say_what_works(value, message):
    with pytest.raises(MemfitError, match=message):
        schedule.parse(value)


@pytest.fixture(scope="module")
def gpt():
    return models.load("gpt", size="tiny", batch_size=4)


def test_the_library_yaml_trainers_and_attribution_apply_a_spelling_alike(gpt, tmp_path):
    model, batch, loss_fn = gpt
    p = memfit.plan(model, batch, loss_fn, "85%", cost="flops")
    (tmp_path / "p.json").write_text(p.to_json())
    for spelling in (
        True,
        "off",
        "every:2",
        "selective",
        f"plan:{tmp_path / 'p.json'}",
        p,
        {"transformer.h": "scores"},
        [Unit(0, 2, "recompute"), Unit(2, 4, "keep")],
    ):
        memfit.apply(model, spelling)
        library = applied_strategy(model)
        models.checkpointing(model, spelling)
        assert applied_strategy(model) == library, spelling
        if not isinstance(spelling, (list, dict)):  # attribution and sessions take what a user writes
            choose_checkpointing(model, None, strategy=spelling)
            assert applied_strategy(model)["units"] == library["units"], spelling
            assert str(Session(strategy=spelling).schedule) == str(schedule.parse(spelling))
    memfit.remove(model)


def test_a_budget_spelling_plans_wherever_there_is_a_batch(gpt):
    model, batch, loss_fn = gpt
    expected = memfit.plan(model, batch, loss_fn, "85%", cost="flops").units
    for apply in (
        lambda: memfit.apply(model, "plan:85%", batch=batch, loss_fn=loss_fn, cost="flops"),
        lambda: memfit.apply(model, "budget:85%", batch=batch, loss_fn=loss_fn, cost="flops"),
        lambda: memfit.apply(model, budget="85%", batch=batch, loss_fn=loss_fn, cost="flops"),
    ):
        memfit.remove(model)
        apply()
        assert applied_strategy(model)["units"] == expected
    for where in (lambda: memfit.apply(model, "plan:85%"), lambda: models.checkpointing(model, "budget:85%")):
        with pytest.raises(MemfitError, match="batch"):
            where()
    memfit.remove(model)


def test_a_config_with_a_bad_schedule_fails_before_any_work():
    with pytest.raises(MemfitError, match="training.gradient_checkpointing: unknown strategy 'sometimes'"):
        resolve(None, {"training.gradient_checkpointing": "sometimes"})
    with pytest.raises(MemfitError, match="training.memory_budget: cannot read budget"):
        resolve(None, {"training.memory_budget": "lots"})
    assert (
        resolve(None, {"training.gradient_checkpointing": "budget:60%"})["training"]["gradient_checkpointing"]
        == "budget:60%"
    )  # stays as written, for the saved config


def test_a_plan_for_both_jepa_parts_is_applied_to_both():
    """A Plan given for the whole JEPA was read as `blocks` (a truthy value) for each part; and planning
    crashed on the EMA target encoder's blocks, which run without grad and have no backward."""
    model, batch, loss_fn = models.load("vit-jepa", size="tiny", batch_size=32)
    p = memfit.plan(model, batch, loss_fn, "75%", cost="flops")
    assert {str(b.mode) for b in p.blocks} != {"recompute"}
    assert {str(b.mode) for b in p.blocks if b.name.startswith("target_encoder")} == {"keep"}
    assert measure(model, batch, loss_fn, p, timed_steps=0, flops=False)["peak_bytes"] == p.predicted_peak_bytes
    built = models.vit_jepa.create_jepa(models.vit_jepa.SIZES["tiny"], p)
    assert applied_strategy(built)["units"] == p.units
