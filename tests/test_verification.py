"""`memfit verify`, through the library and the command line."""

import copy
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import verify_cases

from memfit import MemfitError, models, verify
from memfit.cli import main

STRATEGIES = ["blocks", "every:2", "segments:2", "sqrt", "selective", "scores", "pointwise", "none"]


def test_default_gpt_blocks_halves_the_peak(tmp_path, cli):
    """The issue's own check: `memfit verify --model gpt --strategy blocks --json r.json`, with two timed steps
    where the default times five (the steps are alike; each costs the suite about 10 seconds)."""
    out = tmp_path / "r.json"
    r = cli("verify", "--model", "gpt", "--strategy", "blocks", "--steps", "2", "--json", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout
    report = json.loads(out.read_text())
    for key in (
        "model",
        "strategy",
        "device",
        "memory_source",
        "memory_reduction",
        "slowdown",
        "recompute_flops",
        "grads_bitwise_equal",
        "grads_max_rel_diff",
        "buffers_equal",
        "passed",
    ):
        assert key in report
    assert report["memory_source"] == "storage-tracker"
    assert report["checkpointed"]["peak_bytes"] <= 0.5 * report["baseline"]["peak_bytes"]
    assert report["grads_bitwise_equal"] and report["passed"]
    assert report["recompute_flops"] > 0.2  # one extra forward per block


def test_resnet_se_batchnorm_equal_and_torch_checkpoint_is_not(tmp_path, cli):
    ours, theirs = tmp_path / "ours.json", tmp_path / "torch.json"
    r = cli("verify", "--model", "resnet-se", "--strategy", "blocks", "--steps", "2", "--json", str(ours))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(ours.read_text())
    assert report["buffers_equal"] and report["grads_bitwise_equal"]
    r = cli(
        "verify",
        "--model",
        "resnet-se",
        "--strategy",
        "blocks",
        "--steps",
        "2",
        "--torch-checkpoint",
        "--json",
        str(theirs),
    )
    assert r.returncode == 1 and "FAIL" in r.stdout and "buffers differ" in r.stdout
    assert not json.loads(theirs.read_text())["buffers_equal"]


def test_mlp_with_dropout_bitwise():
    model, batch, loss_fn = models.load("mlp")
    assert any(getattr(m, "p", 0) > 0 for m in model.modules())  # dropout is active
    report = verify(model, batch, loss_fn, "blocks", steps=1)
    assert report["grads_bitwise_equal"] and report["passed"] and report["memory_reduction"] > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ["gpt", "resnet-se", "mlp"])
def test_every_strategy_passes_on_every_model(name, strategy):
    model, batch, loss_fn = models.load(name, size="tiny")
    report = verify(model, batch, loss_fn, strategy, steps=1, name=name)
    assert report["passed"], report["failures"]
    assert report["grads_bitwise_equal"] and report["buffers_equal"] and report["losses_equal"]
    if strategy == "none":
        assert report["memory_reduction"] == 0
    elif strategy in ("selective", "scores"):  # norms, activations, dropout, (some) batched matmuls
        assert report["memory_reduction"] > 0 and 0 <= report["recompute_flops"] < 0.1
        if strategy == "selective":  # gpt's attention runs bmm (dropout on CPU); tiny's scores do not expand
            assert (report["recompute_flops"] > 0) == (name == "gpt")
    elif strategy == "pointwise":  # recomputes no matrix products
        assert report["memory_reduction"] > 0 and report["recompute_flops"] == 0
    else:
        assert report["memory_reduction"] > 0 and report["recompute_flops"] > 0


@pytest.mark.parametrize("strategy", ["blocks", "sqrt", "selective"])
@pytest.mark.parametrize("name", ["vit-jepa", "video"])
def test_recipe_models_pass_verify(name, strategy):
    # the small video model: sqrt on the tiny one's 2 spatial blocks is one segment, which saves nothing
    model, batch, loss_fn = models.load(name, size="tiny" if name == "vit-jepa" else "small", batch_size=8)
    report = verify(model, batch, loss_fn, strategy, steps=1, name=name)
    assert report["passed"], report["failures"]
    assert report["grads_bitwise_equal"] and report["buffers_equal"] and report["memory_reduction"] > 0


def test_expect_reduction_range_decides_pass_or_fail():
    model, batch, loss_fn = models.load("gpt", size="tiny")
    report = verify(model, batch, loss_fn, "blocks", steps=1, expect_reduction=(0.99, 1.0))
    assert not report["passed"] and "outside the expected" in report["failures"][0]


def test_user_factory(tmp_path, cli):
    (tmp_path / "mymodel.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        def make(batch_size=16):
            torch.manual_seed(0)
            model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(4)])
            x = torch.randn(batch_size, 64)
            return model, x, lambda m, batch: m(batch).pow(2).mean()
    """)
    )
    r = cli(
        "verify", "--model", "mymodel:make", "--strategy", "every:2", "--steps", "1", "--batch-size", "64", cwd=tmp_path
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(2 of 4 blocks)" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gpt3"], "unknown model 'gpt3'"),
        (["--strategy", "everything"], "unknown strategy"),
        (["--strategy", "every:0"], "every:0 needs a positive integer"),
        (["--strategy", "segments:-1"], "segments:-1 needs a positive integer"),
        (["--model", "no_such_pkg.mod:make"], "cannot import 'no_such_pkg.mod'"),
        (["--model", "badfactory:wrong"], "not (model, batch, loss_fn)"),
        (["--model", "badfactory:missing"], "has no function 'missing'"),
        (["--model", "badfactory:noblocks"], "no chain of repeated blocks"),
        (["--size", "huge"], "unknown size 'huge'"),
        (["--batch-size", "0"], "batch size must be a positive integer"),
        (["--expect-reduction", "40:20"], "MIN:MAX"),
        (["--expect-reduction", "20:500"], "MIN:MAX"),  # percent: at most 100
        (["--json", "/no/such/dir/r.json"], "cannot write"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    """In this process, as tests/test_cli.py does (`test_bad_input_exits_2_from_a_new_process` runs one in a new
    process, as a user does)."""
    (tmp_path / "badfactory.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        def wrong():
            return nn.Linear(2, 2)

        def noblocks():
            return nn.Linear(2, 2), torch.randn(1, 2), lambda m, b: m(b).sum()
    """)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "badfactory", raising=False)
    assert main(["verify", "--steps", "1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_bad_input_exits_2_from_a_new_process(cli):
    r = cli("verify", "--strategy", "every:0")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == "memfit: error: " + r.stderr.strip().split("memfit: error: ")[-1]
    assert "every:0 needs a positive integer" in r.stderr and "Traceback" not in r.stderr


def test_selective_modes_trade_memory_for_flops_in_order():
    """Attention through batched matmuls (dropout on CPU), with scores larger than
    the heads: selective recomputes both products, scores only q @ k^T,
    pointwise neither; memory goes the other way."""
    torch.manual_seed(0)
    model = models.gpt.create_gpt(dict(block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.1))
    idx = torch.randint(model.config.vocab_size, (4, 65), generator=torch.Generator().manual_seed(1))
    batch = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    reports = {s: verify(model, batch, models.gpt.loss_fn, s, steps=1) for s in ("selective", "scores", "pointwise")}
    assert all(r["passed"] and r["grads_bitwise_equal"] for r in reports.values())
    flops = {s: r["recompute_flops"] for s, r in reports.items()}
    peak = {s: r["checkpointed"]["peak_bytes"] for s, r in reports.items()}
    assert flops["selective"] > flops["scores"] > flops["pointwise"] == 0
    assert peak["selective"] < peak["scores"] < peak["pointwise"]


def test_cli_dtype_bf16_halves_the_static_bytes(tmp_path):
    """--dtype bf16: weights in bf16 (as a GPU run in bf16 would hold them), checked like fp32."""
    from memfit.cli import main

    reports = {}
    for dtype in ("fp32", "bf16"):
        path = tmp_path / f"{dtype}.json"
        assert main(["verify", "--size", "tiny", "--steps", "1", "--dtype", dtype, "--json", str(path)]) == 0
        reports[dtype] = json.loads(path.read_text())
    fp32, bf16 = (reports[d]["baseline"] for d in ("fp32", "bf16"))
    assert bf16["static_bytes"] < 0.55 * fp32["static_bytes"]  # params and AdamW state; the int batch is unchanged
    assert reports["bf16"]["passed"] and reports["bf16"]["grads_bitwise_equal"]


CASES = Path(__file__).parent


@pytest.mark.parametrize(
    "case, steps, failure, others",
    [
        ("wrong_gradients", 1, "gradients differ", ()),
        ("wrong_losses", 2, "losses differ", ("gradients differ", "parameters differ")),
        (
            "drifting_parameters",
            1,
            "parameters differ after training although every gradient was equal",
            ("gradients differ", "losses differ"),
        ),
        ("no_saving", 1, "no memory saved", ("gradients differ", "losses differ", "parameters differ")),
    ],
)
def test_verify_fails_when_checkpointing_is_not_the_same_training(case, steps, failure, others, cli):
    """Models checkpointing cannot make exact (tests/verify_cases.py): verify fails with the sentence that says
    what differs, and only that, in the library, and with exit code 1 and FAIL on the command line."""
    model, batch, loss_fn = getattr(verify_cases, case)()
    report = verify(model, batch, loss_fn, "blocks", steps=steps)
    assert not report["passed"]
    assert any(failure in f for f in report["failures"]), report["failures"]
    assert not any(o in f for f in report["failures"] for o in others), report["failures"]
    if case == "wrong_gradients":  # the command line, once: FAIL, the sentence, exit code 1
        r = cli("verify", "--model", f"verify_cases:{case}", "--steps", str(steps), cwd=CASES)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "FAIL" in r.stdout and failure in " ".join(r.stdout.split())


def test_the_largest_relative_difference_is_relative_to_the_plain_tensors_largest_element():
    """What `verify` compares gradients and parameters with: max |a - b| / max |a|, the absolute difference
    where a is all zeros, and 0 for empty tensors (a parameter with no elements)."""
    from memfit.tools.verification import _max_rel_diff

    a, b = torch.tensor([10.0, -20.0]), torch.tensor([10.5, -20.0])
    assert _max_rel_diff(a, b) == 0.5 / 20
    assert _max_rel_diff(torch.tensor([0.5, -0.25]), torch.tensor([0.25, -0.25])) == 0.5  # small gradients too
    assert _max_rel_diff(torch.zeros(2), torch.tensor([0.0, 0.25])) == 0.25
    assert _max_rel_diff(a, a.clone()) == 0.0
    assert _max_rel_diff(torch.empty(0), torch.empty(0)) == 0.0


FAILURE_CASES = [  # (reduction, strategy none, expect_reduction, grads, buffers, params, losses, tolerance, first loss)
    ((0.5, False, None, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0), []),
    ((0.0, False, None, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0), ["no memory saved"]),
    ((-0.1, True, None, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0), []),  # `none` saves nothing, and may not
    ((0.3, False, (0.3, 0.5), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0), []),  # the bounds are inclusive
    ((0.5, False, (0.3, 0.5), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0), []),
    ((0.29, False, (0.3, 0.5), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0), ["outside the expected 30%..50%"]),
    ((0.51, False, (0.3, 0.5), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0), ["outside the expected"]),
    ((0.0, False, (0.0, 0.5), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0), []),  # an expected range replaces "any saving"
    ((0.5, False, None, 1e-4, 0.0, 0.0, 0.0, 1e-4, 1.0), []),  # at the tolerance passes
    (
        (0.5, False, None, 2e-4, 0.0, 0.0, 0.0, 1e-4, 1.0),
        ["gradients differ (max relative difference 0.0002 > 0.0001)"],
    ),
    ((0.5, False, None, 1e-9, 0.0, 1e-9, 0.0, 0.0, 1.0), ["gradients differ"]),  # parameters differ: explained
    ((0.5, False, None, 0.0, 1e-9, 0.0, 0.0, 0.0, 1.0), ["buffers differ"]),
    ((0.5, False, None, 0.0, 1e-4, 0.0, 0.0, 1e-4, 1.0), []),
    ((0.5, False, None, 0.0, 0.0, 1e-9, 0.0, 0.0, 1.0), ["parameters differ after training although every gradient"]),
    ((0.5, False, None, 0.0, 0.0, 0.0, 1e-9, 0.0, 1.0), ["losses differ"]),
    ((0.5, False, None, 0.0, 0.0, 0.0, 2e-4, 1e-4, 3.0), []),  # the loss tolerance scales with the loss
    ((0.5, False, None, 0.0, 0.0, 0.0, 4e-4, 1e-4, -3.0), ["losses differ"]),
    ((0.5, False, None, 0.0, 0.0, 0.0, 1e-4, 1e-4, 0.5), []),  # ... but never below the gradient tolerance
    ((0.5, False, None, 0.0, 0.0, 0.0, 1.1e-4, 1e-4, 0.5), ["losses differ"]),
]


@pytest.mark.parametrize("arguments, expected", FAILURE_CASES)
def test_each_failure_is_found_at_its_bound_and_said_once(arguments, expected):
    """`verify`'s decision, case by case: each failure sentence appears exactly when its number crosses its
    bound, and no other (the end-to-end runs above show the numbers reach it)."""
    from memfit.tools.verification import _failures

    got = _failures(*arguments)
    assert len(got) == len(expected), got
    assert all(e in g for e, g in zip(expected, got)), got


class _TwoLayers(torch.nn.Module):
    """`skew` scales the first layer's gradient (a run whose gradients differ there only); `skip` leaves the
    second layer out of the step (a run in which a parameter gets no gradient)."""

    def __init__(self, skew=1.0, skip=False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.skew, self.skip = skew, skip

    def forward(self, x):
        h = self.a(x)
        if self.skew != 1.0:  # the same values; the gradient into the first layer scaled, the second's as it was
            h.register_hook(lambda grad: grad * self.skew)
        return h if self.skip else self.b(h)


def test_the_gradient_comparison_sees_every_parameter_and_a_missing_gradient():
    """`verify`'s comparison of two runs' gradients (`_run_both`): bitwise equal only if every parameter's is, the
    largest relative difference over all of them, and an error naming a parameter that got a gradient in one run
    only."""
    from memfit.core.measurement import Run
    from memfit.tools.verification import _run_both

    batch = torch.randn(3, 4)

    def loss_fn(m, x):
        return m(x).square().mean()

    def compare(ckpt_model):
        base = _TwoLayers()
        return _run_both(Run(base, None), Run(ckpt_model, None), batch, loss_fn, 0, 1)

    assert compare(_TwoLayers()) == (0.0, True)
    rel, bitwise = compare(_TwoLayers(skew=1.5))  # only the first layer's gradient differs, by half
    assert not bitwise and rel == pytest.approx(0.5)
    with pytest.raises(MemfitError, match="parameter b.weight got a gradient in one run and not the other"):
        compare(_TwoLayers(skip=True))


def test_the_comparison_runs_the_steps_asked_for_from_the_seed_asked_for():
    """Both runs step from `seed` (step k draws with seed + k: another seed, other dropout masks) and are timed
    for `n_steps` steps after the warm-up, memory and FLOPs steps."""
    from memfit.core.measurement import Run
    from memfit.tools.verification import _run_both

    batch = torch.randn(8, 16)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.5))

    def loss_fn(m, x):
        return m(x).square().mean()

    for seed, n_steps in [(0, 1), (7, 3)]:
        runs = [Run(copy.deepcopy(model), None), Run(copy.deepcopy(model), None)]
        _run_both(*runs, batch, loss_fn, seed, n_steps)
        torch.manual_seed(seed)
        assert runs[0].losses[0] == loss_fn(copy.deepcopy(model), batch), seed
        assert [len(r.times) for r in runs] == [n_steps, n_steps] and len(runs[0].losses) == 3 + n_steps
