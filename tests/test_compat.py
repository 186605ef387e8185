"""Where people train: Hugging Face models, mixed precision, torch.compile,
stochastic depth, DataParallel, DDP. Each test compares against the same
training without checkpointing."""

import copy

import pytest
import torch
from recompute import counting
from torch import nn

import memfit
from memfit import models
from memfit.core.strategies import Unit
from memfit.core.wrapping import wrapped_blocks
from memfit.models import REGISTRY, gpt

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def grads(model, batch, loss_fn, seed=1, autocast=None, device="cpu", scaler=None):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
        loss = loss_fn(model, batch)
    (scaler.scale(loss) if scaler else loss).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def checkpointed(model, batch, loss_fn, **kwargs):
    """`grads` of a model memfit wrapped, once it is seen to have wrapped blocks and to recompute in backward."""
    assert wrapped_blocks(model)
    with counting() as recomputed:
        result = grads(model, batch, loss_fn, **kwargs)
    assert recomputed.anything
    return result


def assert_equal_grads(a, b, exact=True):
    (loss_a, ga), (loss_b, gb) = a, b
    assert ga.keys() == gb.keys()
    for n in ga:
        if exact:
            assert torch.equal(ga[n], gb[n]), n
        else:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)
    assert torch.equal(loss_a, loss_b) if exact else torch.allclose(loss_a, loss_b, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["blocks", "selective", "sqrt"])
@pytest.mark.parametrize(
    "kind, layers", [("gpt2", "transformer.h"), ("llama", "model.layers"), ("bert", "bert.encoder.layer")]
)
def test_hugging_face_models(kind, layers, strategy):
    pytest.importorskip("transformers")
    model, batch, loss_fn = models.load(f"hf:{kind}", size="tiny", batch_size=2)
    model.train()
    assert [n for n, _ in memfit.find_blocks(model)] == [f"{layers}.{i}" for i in range(4)]
    plain = grads(model, batch, loss_fn)
    had_cache = getattr(model.config, "use_cache", None)
    memfit.apply(model, strategy)
    assert_equal_grads(plain, checkpointed(model, batch, loss_fn))  # bitwise, dropout replayed
    memfit.remove(model)
    assert getattr(model.config, "use_cache", None) == had_cache  # turned off while applied, then restored


def test_hugging_face_plan():
    pytest.importorskip("transformers")
    model, batch, loss_fn = models.load("hf:gpt2", size="tiny", batch_size=4)
    plan = memfit.plan(model, batch, loss_fn, "70%", cost="flops")
    report = memfit.verify(model, batch, loss_fn, plan, steps=1)
    assert report["passed"] and report["checkpointed"]["peak_bytes"] <= plan.budget_bytes


@pytest.mark.parametrize("strategy", ["blocks", "selective", "segments:2"])
@pytest.mark.parametrize("name", ["gpt", "resnet-se"])
def test_bf16_autocast(name, strategy):
    model, batch, loss_fn = REGISTRY[name].build("tiny", batch_size=4)
    plain = grads(model, batch, loss_fn, autocast=torch.bfloat16)
    wrapped = memfit.apply(copy.deepcopy(model), strategy)
    assert_equal_grads(plain, checkpointed(wrapped, batch, loss_fn, autocast=torch.bfloat16))


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["blocks", "selective", "segments:2"])
def test_cuda_autocast_and_fp16_gradient_scaler(dtype, strategy):
    """On CUDA: bf16, and fp16 with a gradient scaler (the same scale for both runs)."""
    model, batch, loss_fn = REGISTRY["gpt"].build("tiny", batch_size=4)
    model, batch = model.cuda(), tuple(t.cuda() for t in batch)
    scale = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    plain = grads(model, batch, loss_fn, autocast=dtype, device="cuda", scaler=scale)
    wrapped = memfit.apply(copy.deepcopy(model), strategy)
    assert_equal_grads(plain, grads(wrapped, batch, loss_fn, autocast=dtype, device="cuda", scaler=scale), exact=False)


@pytest.mark.parametrize("strategy", ["blocks", "selective", "sqrt"])
def test_torch_compile_matches_eager(strategy):
    """aot_eager on CPU; without dropout, whose random numbers compiled code draws differently."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = gpt.create_gpt(dict(block_size=32, n_layer=4, n_head=2, n_embd=64, dropout=0.0))
    batch = gpt.batch("tiny", 2)
    eager = grads(model, batch, gpt.loss_fn)
    compiled = torch.compile(memfit.apply(copy.deepcopy(model), strategy), backend="aot_eager")
    loss, g = grads(compiled, batch, gpt.loss_fn)
    assert_equal_grads(eager, (loss, {k.removeprefix("_orig_mod."): v for k, v in g.items()}), exact=False)


@pytest.mark.parametrize("strategy, regions", [("blocks", 4), ("selective", 4), ("every:2", 2), ("sqrt", 4)])
def test_torch_compile_traces_the_whole_model(strategy, regions):
    """No graph break: a break in the blocks' loop makes dynamo run the whole model eagerly."""
    torch._dynamo.reset()
    model = memfit.apply(gpt_no_dropout().train(), strategy)
    explained = torch._dynamo.explain(model)(gpt.batch("tiny", 2)[0])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    code = explained.graphs[0].code  # the model's graph, not a block's frame compiled after the model's was skipped
    assert "transformer_modules_wte" in code and code.count("tag_activation_checkpoint(") == regions


def test_verify_compile_measures_the_compiled_step():
    """Under compile, checkpointing keeps saving memory, and the numbers are the compiled code's: its graphs ran
    in every measured step, and its peaks and FLOPs are not eager's (the tracker and the FLOP counter are dispatch
    modes, under which dynamo runs eager code unless they say `ignore_compile_internals`)."""
    torch._dynamo.reset()
    model, batch = gpt_no_dropout(), gpt.batch("tiny", 8)
    eager = memfit.verify(copy.deepcopy(model), batch, gpt.loss_fn, "blocks", steps=1)
    backend = "aot_eager_decomp_partition"
    compiled = memfit.verify(copy.deepcopy(model), batch, gpt.loss_fn, "blocks", steps=1, compile=backend)
    assert compiled["passed"] and compiled["compile"] == backend, compiled["failures"]
    assert compiled["compiled_graph_runs"] == {"baseline": [1, 1, 1, 1], "checkpointed": [1, 1, 1, 1]}
    assert compiled["memory_reduction"] > 0.3
    for run in ("baseline", "checkpointed"):
        assert compiled[run]["peak_bytes"] != eager[run]["peak_bytes"], run
    assert compiled["checkpointed"]["flops"] != eager["checkpointed"]["flops"]  # what the partitioner recomputes
    assert compiled["baseline"]["flops"] == eager["baseline"]["flops"]


def test_op_level_modes_save_their_ops_under_compile(monkeypatch):
    """NOTE [op-level modes under compile]: torch.compile's trace shows the
    policy a `clone` for each dropout of p=0, which eager mode never
    dispatches, so the op numbers drift; a traced policy still saves every op
    its mode lists (here every matmul and attention kernel of each block)."""
    from memfit.core import strategies
    from memfit.planning.frontier import record_ops

    torch._dynamo.reset()
    model, batch = gpt_no_dropout(), gpt.batch("tiny", 8)
    ops = record_ops(model, batch, gpt.loss_fn).blocks[0]
    mode = strategies.Mode.of_ops(
        {
            k: op.name
            for k, op in enumerate(ops)
            if op.name in ("addmm", "mm") or op.name.startswith("_scaled_dot_product")
        }
    )
    made, policy = [], strategies.policy

    def keeping(m):  # each policy made: its decisions, and the names of the ops it was shown
        fresh = policy(m)

        def make(**kw):
            fn, names = fresh(**kw), []

            def spy(ctx, op, *args, **kwargs):
                names.append(strategies.op_name(op))
                return fn(ctx, op, *args, **kwargs)

            spy.decisions = fn.decisions
            made.append((fn.decisions, names))
            return spy

        return make

    monkeypatch.setattr(strategies, "policy", keeping)
    n = len(memfit.find_blocks(model))
    compiled = torch.compile(
        memfit.apply(copy.deepcopy(model), [Unit(i, i + 1, mode) for i in range(n)]), backend="aot_eager"
    )
    gpt.loss_fn(compiled, batch).backward()
    traced = [d for d, names in made if "clone" in names]
    assert traced and all(sum(d) == len(mode.saved) for d in traced)


def test_a_plan_for_the_compiled_step_fits_its_budget_compiled(monkeypatch):
    """NOTE [planning for the compiled step]: the plan's peak is the compiled
    step's, measured again to the byte and within the budget; '80%' is of the
    compiled plain step; the eager plan for the same bytes, compiled, peaks
    above the budget or recomputes no less."""
    from memfit.core.measurement import compiled_step
    from memfit.planning import planner

    monkeypatch.setattr(planner, "COMPILED_TRIES", 2)
    torch._dynamo.reset()
    model, batch, backend = gpt_no_dropout(), gpt.batch("tiny", 8), "aot_eager_decomp_partition"
    p = memfit.plan(model, batch, gpt.loss_fn, "80%", cost="flops", compile=backend)
    assert "compiled steps" in p.sources["memory"]
    assert p.budget_bytes == int(0.8 * p.baseline_peak_bytes)
    peak, flops = compiled_step(model, batch, gpt.loss_fn, p, backend)
    assert peak == p.predicted_peak_bytes <= p.budget_bytes
    eager = memfit.plan(model, batch, gpt.loss_fn, p.budget_bytes, cost="flops")
    eager_peak, eager_flops = compiled_step(model, batch, gpt.loss_fn, eager, backend)
    assert eager_peak > p.budget_bytes or flops <= eager_flops  # the eager plan does not fit, or costs more


def test_verify_compile_sets_a_plan_against_compiles_own_budget(monkeypatch):
    """A plan verified under a partitioning backend is set against torch.compile's activation_memory_budget: the
    budget reported reaches a measured peak no higher than the plan's, and says what it recomputes."""
    from memfit.tools import verification

    monkeypatch.setattr(verification, "COMPILE_BUDGETS", (0.1, 1.0))  # one reaches the peak, one does not
    torch._dynamo.reset()
    model, batch = gpt_no_dropout(), gpt.batch("tiny", 8)
    plan = memfit.plan(model, batch, gpt.loss_fn, "95%", cost="flops")  # a peak the partitioner reaches
    r = memfit.verify(copy.deepcopy(model), batch, gpt.loss_fn, plan, steps=1, compile="aot_eager_decomp_partition")
    assert r["passed"], r["failures"]
    found = r["compile_budget_at_this_peak"]
    assert found is not None and found["budget"] == 0.1
    assert found["peak_bytes"] <= r["checkpointed"]["peak_bytes"] and found["recompute_flops"] >= 0
    assert "compile_budget_at_this_peak" not in memfit.verify(
        copy.deepcopy(model), batch, gpt.loss_fn, plan, steps=1
    )  # eager: nothing to set it against


def test_the_tracker_and_the_allocator_events_agree_on_compiled_code():
    """The storage tracker sees what aot_eager's compiled code allocates: the CPU allocator's events, which also
    see inductor's buffers, give the same peak (12 bytes apart: the profiler's own)."""
    from memfit.core.measurement import Run, compiled, steps

    torch._dynamo.reset()
    model, batch = memfit.apply(gpt_no_dropout(), "blocks"), gpt.batch("tiny", 8)
    peaks = {}
    for events in (False, True):
        forward, calls = compiled(model, "aot_eager_decomp_partition")
        run = Run(
            model, torch.optim.AdamW(model.parameters()), forward=forward, graph_calls=calls, allocator_events=events
        )
        steps([run], batch, gpt.loss_fn, flops=False, timed=0)
        assert run.graphs_per_step == [1, 1]
        peaks[run.mem.source] = run.mem.peak_bytes
    assert set(peaks) == {"storage-tracker", "cpu-allocator events (torch.profiler)"}
    tracker, events = peaks.values()
    assert 0 <= events - tracker <= 12  # the profiler's own allocation, seen by its events only


def test_verify_compile_unknown_backend():
    with pytest.raises(memfit.MemfitError, match="unknown torch.compile backend"):
        memfit.verify(gpt_no_dropout(), gpt.batch("tiny", 2), gpt.loss_fn, compile="fastest")


class DropPathBlock(nn.Module):
    """A residual block with stochastic depth: the whole branch is dropped per sample."""

    def __init__(self, n=16, p=0.5):
        super().__init__()
        self.fc, self.p = nn.Linear(n, n), p

    def forward(self, x):
        keep = (torch.rand(x.shape[0], 1) >= self.p).float() / (1 - self.p) if self.training else 1.0
        return x + torch.tanh(self.fc(x)) * keep


def test_drop_path_decisions_are_replayed():
    torch.manual_seed(0)
    model = nn.Sequential(*[DropPathBlock() for _ in range(6)])
    batch = torch.randn(32, 16)
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    plain = grads(model, batch, loss_fn)
    for strategy in ("blocks", "sqrt", "selective"):
        assert_equal_grads(plain, checkpointed(memfit.apply(copy.deepcopy(model), strategy), batch, loss_fn))


def test_data_parallel_wrapper():
    model, batch, loss_fn = REGISTRY["gpt"].build("tiny", batch_size=4)
    plain = grads(model, batch, loss_fn)
    wrapped = nn.DataParallel(memfit.apply(copy.deepcopy(model), "blocks"))  # without GPUs it calls the module
    loss, g = grads(wrapped, batch, loss_fn)
    assert_equal_grads(plain, (loss, {k.removeprefix("module."): v for k, v in g.items()}))


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpt_no_dropout():
    torch.manual_seed(0)
    return gpt.create_gpt(dict(block_size=32, n_layer=4, n_head=2, n_embd=64, dropout=0.0))


def train_steps(model, batches, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        gpt.loss_fn(model, batches[step]).backward()
        opt.step()


def ddp_worker(rank, port, strategy, find_unused, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = memfit.apply(gpt_no_dropout(), strategy)
        ddp = DDP(model, find_unused_parameters=find_unused)
        batches = [tuple(t[rank::2].contiguous() for t in gpt.batch("tiny", 8, seed=s)) for s in range(3)]
        train_steps(ddp, batches)
        if rank == 0:
            torch.save(model.state_dict(), out)
        dist.barrier()  # gloo can abort a process whose peer ends the group before it ("terminate called ...")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "strategy, find_unused",
    [("blocks", False), ("selective", False), ("sqrt", True), ("pointwise", False), ("every:2", True)],
)
def test_ddp_two_processes_match_one(tmp_path, strategy, find_unused):
    """Two gloo ranks, each on half of the global batch, end with the parameters
    of one process trained on the whole batch without checkpointing."""
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(ddp_worker, args=(free_port(), strategy, find_unused, str(out)), nprocs=2)
    single = gpt_no_dropout()
    train_steps(single, [gpt.batch("tiny", 8, seed=s) for s in range(3)])
    got = torch.load(out, weights_only=True)
    for name, p in single.state_dict().items():
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6, msg=name)
