"""`memfit train --distributed ddp|fsdp` under torchrun (2 gloo processes on CPU),
FSDP2 with memfit, the per-rank memory model, and the plan broadcast."""

import json
import subprocess
import sys

import pytest
import torch
from test_compat import free_port, gpt_no_dropout

import memfit
from memfit.core.memory import track_memory
from memfit.core.wrapping import applied_strategy
from memfit.models import gpt
from memfit.planning import distributed
from memfit.train.config import resolve
from memfit.train.loop import train

SMALL = {
    "model.n_layer": "4",
    "model.n_embd": "64",
    "model.n_head": "2",
    "model.block_size": "32",
    "model.dropout": "0.0",
    "training.batch_size": "8",
    "training.max_iters": "3",
    "training.eval_iters": "1",
    "training.memory_budget": "1GiB",
    "training.device": "cpu",
}


def torchrun(out, *args):
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "memfit",
            "train",
            "--config",
            "configs/gpt-char.yaml",
            *sets,
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same config trained in this process, without checkpointing or torch.distributed."""
    out = tmp_path_factory.mktemp("single")
    train(resolve("configs/gpt-char.yaml", SMALL), out_dir=out)
    return torch.load(out / "model.pt", weights_only=True)


@pytest.mark.parametrize(
    "kind, strategy",
    [
        pytest.param("ddp", "false", marks=pytest.mark.slow),
        ("ddp", "selective"),  # the default run's check of DDP under torchrun
        pytest.param("fsdp", "false", marks=pytest.mark.slow),
        pytest.param("fsdp", "blocks", marks=pytest.mark.slow),
        pytest.param("fsdp", "sqrt", marks=pytest.mark.slow),
    ],
)
def test_torchrun_matches_one_process(tmp_path, one_process, kind, strategy):
    """Two processes, each on half of the global batch, end with the parameters of
    one process on the whole batch (sqrt: segments of two blocks, one FSDP group each)."""
    run = torchrun(tmp_path, "--distributed", kind, "--gradient-checkpointing", strategy)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{kind.upper()} over 2 processes: global batch 8, 4 per process" in run.stdout
    assert run.stdout.count("final loss") == 1  # rank 0 reports, rank 1 is silent
    got = torch.load(tmp_path / "model.pt", weights_only=True)
    assert got.keys() == one_process.keys()
    for name, p in one_process.items():
        torch.testing.assert_close(got[name], p, rtol=1e-4, atol=1e-5, msg=name)
    summary = json.loads((tmp_path / "summary.json").read_text())
    predicted, measured = summary["report"]["predicted_peak_bytes"], summary["peak_gb"] * 1e9
    # the fullest rank's peak (rank 0's: FSDP2 pads the last ranks' shards), simulated with FSDP2 itself
    # (NOTE [one rank simulated]); DDP's rank is the one-process step plus its gradient buckets
    assert measured == pytest.approx(predicted, rel=1e-12), (predicted, measured)


@pytest.mark.slow
def test_torchrun_fsdp_with_a_budget(tmp_path):
    run = torchrun(tmp_path, "--distributed", "fsdp", "--gradient-checkpointing", "budget:85%")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ENABLED" in run.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["peak_gb"] * 1e9 <= summary["report"]["predicted_peak_bytes"] * 1.01


@pytest.mark.parametrize(
    "args, message",
    [
        (("--gradient-checkpointing", "budget:10%"), "memfit: error: budget"),  # found while planning on rank 0
        (
            ("--set", "training.memory_budget=lots"),
            "memfit: error: training.memory_budget: cannot read budget",
        ),  # config
    ],
)
def test_torchrun_errors_on_rank_0_stop_every_rank(tmp_path, args, message):
    run = torchrun(tmp_path, "--distributed", "fsdp", *args)
    assert run.returncode != 0
    # the message once or from both ranks: torchrun stops the other rank when the first exits with code 2
    assert message in run.stderr, run.stderr[-2000:]
    assert not [line for line in run.stderr.splitlines() if 'File "' in line and "memfit" in line]  # torchrun's only


def test_global_batch_must_split_evenly(tmp_path):
    run = torchrun(tmp_path, "--distributed", "ddp", "--set", "training.batch_size=7")
    assert run.returncode != 0  # torchrun reports its workers' exit code 2 as a failure
    assert "must divide evenly between 2 processes" in run.stderr
    assert not [line for line in run.stderr.splitlines() if 'File "' in line and "memfit" in line]


def test_unknown_distributed_kind_is_an_error():
    from memfit.cli import main

    assert main(["train", "--distributed", "horovod", "--max-iters", "1"]) == 2


def test_one_process_without_torchrun(tmp_path):
    """--distributed without torchrun: world size 1 on a free port, same training as without."""
    cfg = resolve("configs/gpt-char.yaml", {**SMALL, "training.distributed": "fsdp"})
    summary = train(cfg, out_dir=tmp_path)
    plain = train(resolve("configs/gpt-char.yaml", SMALL))
    assert summary["report"]["world_size"] == 1
    assert summary["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)


def plan_worker(rank, port, out):
    """Rank 0 plans for one FSDP rank and broadcasts; every rank applies, shards and trains."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ranks = distributed.Ranks("fsdp", rank, 2)
    try:
        model = gpt_no_dropout()
        batches = [distributed.local(gpt.batch("tiny", 16, seed=s), ranks) for s in range(3)]
        the_plan = (
            memfit.plan(model, batches[0], gpt.loss_fn, "70%", cost="flops", distributed=("fsdp", 2)).to_json()
            if rank == 0
            else None
        )
        the_plan = memfit.Plan.from_json(distributed.broadcast(the_plan, ranks))
        memfit.apply(model, the_plan)
        units = [(u.start, u.stop, str(u.mode)) for u in applied_strategy(model)["units"]]
        distributed.parallelize(model, ranks)
        opt = torch.optim.AdamW(model.parameters())
        peaks = []
        for batch in batches:
            with track_memory(model, opt, batch) as mem:
                opt.zero_grad(set_to_none=True)
                gpt.loss_fn(model, batch).backward()
                opt.step()
            peaks.append(mem.peak_bytes)
        torch.save(
            {
                "units": units,
                "peak": max(peaks),
                "budget": the_plan.budget_bytes,
                "predicted": the_plan.predicted_peak_bytes,
            },
            f"{out}.{rank}",
        )
        dist.barrier()  # gloo can abort a process whose peer ends the group before it
    finally:
        dist.destroy_process_group()


def test_plan_is_made_once_and_fits_every_fsdp_rank(tmp_path):
    out = tmp_path / "rank"
    torch.multiprocessing.spawn(plan_worker, args=(free_port(), str(out)), nprocs=2)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert r0["units"] == r1["units"] and any(mode != "keep" for _, _, mode in r0["units"])
    # per rank, simulated with FSDP2 itself: rank 0 to the byte, rank 1 (its shards padded) at most as high
    assert r0["predicted"] <= r0["budget"] and r0["peak"] == r0["predicted"], r0
    assert r1["peak"] <= r1["predicted"] == r0["predicted"], r1


def test_a_segment_plans_per_rank_prediction_counts_the_segment_as_one_fsdp_group():
    """The planner simulates candidate units on a copy; the FSDP groups are that copy's units, as they will
    be sharded, not whatever is applied to the model being planned (once: one group per block)."""
    import copy

    import memfit
    from memfit.models import REGISTRY
    from memfit.planning.simulation import simulate

    model, batch, loss_fn = REGISTRY["gpt"].build("tiny", batch_size=2)
    wrapped = memfit.apply(copy.deepcopy(model), "segments:1")  # what train shards and reports
    expected = simulate(wrapped, batch, loss_fn, None, distributed=("fsdp", 2)).peak_bytes
    assert simulate(model, batch, loss_fn, "segments:1", distributed=("fsdp", 2)).peak_bytes == expected
    blocks = simulate(model, batch, loss_fn, "blocks", distributed=("fsdp", 2)).peak_bytes
    assert expected != blocks
