"""memfit.integrations: the real Hugging Face and Lightning trainers on CPU with
tiny models, each with and without MemfitCallback, compared step for step."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trainers

from memfit.core.strategies import KEEP
from memfit.core.wrapping import wrapped_blocks
from memfit.errors import MemfitError
from memfit.integrations import Session


# Each extra is skipped where it is used: without lightning the Hugging Face and plain-torch tests still run.
@pytest.fixture
def memfit_hf():
    pytest.importorskip("transformers")
    from memfit.integrations import transformers

    return transformers


@pytest.fixture
def memfit_lightning():
    pytest.importorskip("lightning.pytorch")
    from memfit.integrations import lightning

    return lightning


def check_fits(callback, peaks):
    """The plan is applied and every measured step's peak fits the budget, as predicted."""
    plan = callback.plan
    assert plan is not None and any(b.mode != KEEP for b in plan.blocks), plan
    assert len(peaks) == trainers.STEPS
    assert max(peaks) <= plan.budget_bytes, (peaks, plan.budget_bytes)
    # after the first step has made the optimizer state, the step is the one the plan predicted
    assert abs(peaks[-1] - plan.predicted_peak_bytes) <= 0.01 * plan.predicted_peak_bytes, peaks


@pytest.fixture(scope="module")
def hf_plain(tmp_path_factory):
    pytest.importorskip("transformers")
    losses, trainer = trainers.hf_run(out_dir=tmp_path_factory.mktemp("hf"))
    return losses, trainers.weights(trainer.model)


def test_hf_trainer_with_a_budget(hf_plain, tmp_path, memfit_hf):
    callback = memfit_hf.MemfitCallback(budget="60%", cost="flops")
    losses, trainer = trainers.hf_run(callback, out_dir=tmp_path)
    assert losses == hf_plain[0]  # dropout on
    trainers.assert_same_weights(trainers.weights(trainer.model), hf_plain[1])  # bitwise
    applied = dict(wrapped_blocks(trainer.model))
    assert applied == {b.name: b.mode for b in callback.plan.blocks if b.mode != KEEP}
    check_fits(callback, callback.peaks)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["memory/peak"] * 1e9 <= callback.plan.budget_bytes for h in logged)
    assert logged[-1]["memory/budget"] == callback.plan.budget_bytes / 1e9
    assert "transformer.h.0" in callback.report and "predicted peak" in callback.report


@pytest.fixture
def hf_warnings():
    """What memfit says through the Trainer's logger (which does not propagate to the root)."""
    records, logger = [], logging.getLogger("transformers.trainer")
    handler, level = logging.Handler(logging.WARNING), logger.level
    handler.emit = records.append
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # whatever verbosity other tests left to transformers
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_hf_trainer_fine_tuning_a_lora_adapter(tmp_path, memfit_hf):
    plain, plain_trainer = trainers.hf_run(out_dir=tmp_path, lora=True)
    callback = memfit_hf.MemfitCallback(budget="60%", cost="flops")
    losses, trainer = trainers.hf_run(callback, out_dir=tmp_path, lora=True)
    assert losses == plain
    trainers.assert_same_weights(trainers.weights(trainer.model), trainers.weights(plain_trainer.model))
    assert [n for n, _ in wrapped_blocks(trainer.model)][0].startswith("base_model.model.transformer.h.")
    check_fits(callback, callback.peaks)


def test_hf_trainer_gradient_checkpointing_is_replaced(hf_plain, tmp_path, hf_warnings, memfit_hf):
    callback = memfit_hf.MemfitCallback(strategy="blocks")
    losses, trainer = trainers.hf_run(callback, out_dir=tmp_path, gradient_checkpointing=True)
    said = [r.getMessage() for r in hf_warnings if "memfit" in r.getMessage()]
    assert len(said) == 1 and "gradient_checkpointing=True" in said[0], said
    assert not trainer.model.is_gradient_checkpointing
    assert len(wrapped_blocks(trainer.model)) == 4
    assert losses == hf_plain[0]
    trainers.assert_same_weights(trainers.weights(trainer.model), hf_plain[1])


def test_hf_trainer_gradient_accumulation_is_said(tmp_path, hf_warnings, memfit_hf):
    trainers.hf_run(memfit_hf.MemfitCallback(strategy="blocks"), out_dir=tmp_path, steps=1, accumulation=2)
    said = [r.getMessage() for r in hf_warnings if "memfit" in r.getMessage()]
    assert len(said) == 1 and "accumulated over 2 batches" in said[0], said


def test_hf_trainer_budget_that_cannot_be_met_stops_before_training(tmp_path, memfit_hf):
    callback = memfit_hf.MemfitCallback(budget="1KB", cost="flops")
    with pytest.raises(MemfitError, match=r"^budget 1000 B is below the smallest peak .*; give a budget of at least"):
        trainers.hf_run(callback, out_dir=tmp_path)
    assert callback.plan is None and callback.peaks == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": "60 apples"}, "cannot read budget '60 apples'"),
        ({"budget": "60%", "strategy": "blocks"}, "not both"),
        ({"cost": "speed"}, "unknown cost 'speed'"),
    ],
)
def test_bad_arguments_fail_when_the_callback_is_made(kwargs, message, memfit_hf, memfit_lightning):
    with pytest.raises(MemfitError, match=message):
        memfit_hf.MemfitCallback(**kwargs)
    with pytest.raises(MemfitError, match=message):
        memfit_lightning.MemfitCallback(**kwargs)


@pytest.fixture(scope="module")
def lightning_plain():
    pytest.importorskip("lightning.pytorch")
    losses, trainer = trainers.lightning_run()
    return losses, trainers.weights(trainer.lightning_module)


def test_lightning_with_a_budget(lightning_plain, memfit_lightning):
    callback = memfit_lightning.MemfitCallback(budget="60%", cost="flops")
    losses, trainer = trainers.lightning_run(callback)
    assert losses == lightning_plain[0]  # dropout on
    trainers.assert_same_weights(trainers.weights(trainer.lightning_module), lightning_plain[1])  # bitwise
    assert dict(wrapped_blocks(trainer.lightning_module)) == {
        b.name: b.mode for b in callback.plan.blocks if b.mode != KEEP
    }
    check_fits(callback, callback.peaks)
    assert trainer.callback_metrics["memory/peak"].item() == pytest.approx(callback.peaks[-1] / 1e9)


def test_lightning_budget_that_cannot_be_met_stops_before_training(memfit_lightning):
    callback = memfit_lightning.MemfitCallback(budget="1KB", cost="flops")
    with pytest.raises(MemfitError, match=r"^budget 1000 B is below the smallest peak"):
        trainers.lightning_run(callback)
    assert callback.plan is None and callback.peaks == []


def test_lightning_fsdp1_is_refused_before_it_wraps(memfit_lightning):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy())  # the real strategy needs a GPU to run
    with pytest.raises(MemfitError, match="use ModelParallelStrategy and memfit.integrations.lightning.fully_shard"):
        memfit_lightning.MemfitCallback(budget="60%").setup(trainer, trainers.lightning_module(), "fit")


def test_accelerate_needs_only_memfit_apply():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    plain, plain_model, _ = trainers.accelerate_run()
    losses, model, plan = trainers.accelerate_run(budget="60%")
    assert losses == plain  # dropout on
    trainers.assert_same_weights(trainers.weights(model), trainers.weights(plain_model))  # bitwise
    assert dict(wrapped_blocks(model)) == {b.name: b.mode for b in plan.blocks if b.mode != KEEP} != {}


def test_session_leaves_the_random_numbers_alone():
    """Planning on the first batch draws no number the training would have drawn."""
    model = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.5)) for _ in range(3)]
    )
    batch = torch.randn(512, 16)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    session = Session(budget="80%", cost="time")  # timed steps run dropout on the model itself
    session.prepare(model, batch, lambda m, x: m(x).sum())
    assert session.plan is not None and torch.equal(torch.rand(3), expected)


def torchrun(kind, out):
    script = Path(__file__).with_name("trainers.py")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            kind,
            str(out),
            "80%",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize(
    "kind, how", [("hf", "DDP"), pytest.param("lightning", "DDP", marks=pytest.mark.slow), ("lightning-fsdp", "FSDP")]
)
def test_two_gloo_processes(kind, how, tmp_path):
    """DDP (and FSDP2 under Lightning's ModelParallelStrategy): rank 0's plan, for one
    rank, is applied on both; the losses equal the run without memfit step for step,
    and each rank's peak fits the budget."""
    pytest.importorskip("transformers" if kind == "hf" else "lightning.pytorch")
    ranks = torchrun(kind, tmp_path / "run")
    assert ranks[0]["plan"] == ranks[1]["plan"] and ranks[0]["wrapped"] == ranks[1]["wrapped"] != []
    assert f"on each of 2 {how} processes" in ranks[0]["report"]
    for r in ranks:
        assert r["memfit"] == r["plain"]
        assert r["weights"][0] == r["weights"][1]  # this rank's trained weights, bitwise
        assert len(r["peaks"]) == trainers.STEPS and max(r["peaks"]) <= r["plan"]["budget_bytes"], r["peaks"]
