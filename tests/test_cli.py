"""Bad input, one row each: one sentence that says what would work, exit code
2, no traceback, and nothing half-written (issue: nothing lost, nothing wrong)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import memfit
from memfit import MemfitError
from memfit.cli import main

USER_MODULES = {
    "raises_on_import.py": "1 / 0\n",
    "broken_syntax.py": "def make(:\n",
    "factories.py": """
import torch
from torch import nn


def failing():
    raise ValueError("no such dataset")


def wrong_shape():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    return model, torch.randn(2, 3), lambda m, b: m(b).sum()


def vector_loss():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    return model, torch.randn(2, 4), lambda m, b: m(b)
""",
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name, text in USER_MODULES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "binary.json").write_bytes(bytes(range(256)))
    good = memfit.plan(*memfit.models.load("mlp", size="tiny")[:3], "90%", cost="flops")
    data = json.loads(good.to_json())
    (tmp_path / "empty.json").write_text(json.dumps({**data, "blocks": []}))
    data["blocks"][0]["segment"] = ["nowhere", data["blocks"][1]["name"]]
    (tmp_path / "segment.json").write_text(json.dumps(data))
    (tmp_path / "a_file").write_text("x")
    np.save(tmp_path / "ok.npy", np.zeros((8, 3, 16, 16), dtype="float32"))
    np.save(tmp_path / "zero.npy", np.zeros((0, 3, 16, 16), dtype="float32"))
    (tmp_path / "garbage.pt").write_bytes(b"not a tensor" * 10)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "frame_000.png").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    return tmp_path


CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "mlp.yaml")
GPT = str(Path(__file__).resolve().parent.parent / "configs" / "gpt-char.yaml")
VERIFY = ["verify", "--model", "mlp", "--size", "tiny", "--steps", "1"]
ROWS = [
    ([*VERIFY, "--strategy", "plan:binary.json"], "is not a text file"),
    (
        ["plan", "--model", "mlp", "--size", "tiny", "--budget", "90%", "--compile", "nosuch"],
        "unknown torch.compile backend 'nosuch'",
    ),
    ([*VERIFY, "--strategy", "plan:empty.json"], "it has no blocks"),
    ([*VERIFY, "--strategy", "plan:segment.json"], "does not contain it"),
    (["verify", "--model", ":"], "names no factory"),
    (["verify", "--model", "json:dumps"], "needs argument 'obj'"),
    (["verify", "--model", "raises_on_import:make"], "your code raised ZeroDivisionError in <module>"),
    (["verify", "--model", "broken_syntax:make"], "has a syntax error"),
    (["verify", "--model", "factories:failing"], "your code raised ValueError in failing"),
    (["verify", "--model", "factories:vector_loss", "--steps", "1"], "loss_fn returned a tensor of shape (2, 4)"),
    (
        ["verify", "--model", "factories:wrong_shape", "--steps", "1"],
        "factories.py:12): mat1 and mat2 shapes cannot be multiplied (2x3 and 4x4)",
    ),
    ([*VERIFY, "--grad-tol", "-1"], "grad_tol -1.0 must be a finite number"),
    ([*VERIFY, "--grad-tol", "nan"], "grad_tol nan must be a finite number"),
    ([*VERIFY, "--json", "/proc/memfit.json"], "cannot write /proc/memfit.json"),
    (["train", "--config", CONFIG, "--metrics", "."], "is a directory"),
    (["train", "--config", CONFIG, "--out", "a_file"], "is a file"),
    (["train", "--config", CONFIG, "--out", "/proc/memfit-run"], "cannot create --out /proc/memfit-run"),
    (["train", "--config", "binary.json"], "is not a text file"),
    (["train", "--config", GPT, "--set", "model.name="], "unknown model ''"),
    (["train", "--config", GPT, "--set", "model.n_head=3"], "must be a multiple of n_head 3"),
    (["train", "--config", GPT, "--set", "model.block_size=0"], "block_size 0 at least 1"),
    (["train", "--config", GPT, "--set", "model.dropout=2"], "dropout probability has to be between 0 and 1"),
    (["attribute", "ok.npy", "--size", "huge"], "unknown size 'huge' for the video model"),
    (["attribute", "zero.npy", "--size", "tiny"], "has no frames"),
    (["attribute", "garbage.pt", "--size", "tiny"], "garbage.pt (not a tensor torch.load reads without pickle)"),
    (["attribute", "frames", "--size", "tiny"], "frame_000.png'); give PNG or JPEG images"),
    (["attribute", "ok.npy", "--size", "tiny", "--weights", "garbage.pt"], "cannot read weights garbage.pt"),
    (["attribute", "ok.npy", "--size", "tiny", "--weights", "tensor.pt"], "hold a Tensor, not a state_dict"),
    (["attribute", "ok.npy", "--size", "tiny", "--weights", "other.pt"], "Missing key(s) in state_dict"),
    (
        ["fit", "--model", "mlp", "--size", "tiny", "--budget", "1KB", "--strategies", "none,blocks"],
        "fits no batch with any of none, blocks: a batch of 1 peaks at",
    ),
]


@pytest.mark.parametrize("args, message", ROWS, ids=[" ".join(a[1:]) for a, _ in ROWS])
def test_bad_input_is_one_sentence_and_exit_2(workdir, capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_debug_shows_the_traceback(workdir):
    with pytest.raises(ValueError, match="no such dataset"):
        main(["verify", "--model", "factories:failing", "--debug"])


@pytest.mark.parametrize(
    "call",
    [
        lambda m: memfit.apply(m, None),
        lambda m: memfit.apply(m, 3),
        lambda m: memfit.apply("model"),
        lambda m: memfit.remove("model"),
    ],
)
def test_python_api_bad_arguments_raise_memfit_errors(call):
    with pytest.raises(MemfitError):
        call(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


LATE = [
    ([*VERIFY, "--json", "r.json"], "r.json", "PASS"),
    (
        [
            "plan",
            "--model",
            "mlp",
            "--size",
            "tiny",
            "--budget",
            "90%",
            "--cost",
            "flops",
            "--no-measure",
            "--json",
            "r.json",
        ],
        "r.json",
        "plan for",
    ),
    (
        ["bench", "--model", "mlp", "--size", "tiny", "--budgets", "90", "--cost", "flops", "--json", "r.json"],
        "r.json",
        "none",
    ),
    (
        [
            "fit",
            "--model",
            "mlp",
            "--size",
            "tiny",
            "--budget",
            "4MiB",
            "--strategies",
            "none",
            "--no-time",
            "--json",
            "r.json",
        ],
        "r.json",
        "largest batch",
    ),
    (["attribute", "ok.npy", "--size", "tiny", "--json", "r.json"], "r.json", "most important frames"),
]


@pytest.mark.parametrize("args, path, shown", LATE, ids=[a[0] for a, _, _ in LATE])
def test_a_write_that_fails_at_the_end_keeps_the_results_on_screen(workdir, capsys, monkeypatch, args, path, shown):
    """The output path passed its check before the work; the disk filled up meanwhile."""
    import errno
    import os

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert shown in captured.out, captured.out
    assert "the results are above, but writing the" in captured.err and "No space left on device" in captured.err
    assert captured.err.count("\n") == 1 and not (workdir / path).exists() and not list(workdir.glob(".r.json*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the simulated CUDA step is for machines without one")
def test_plan_for_cuda_without_one_simulates_and_says_what_may_differ(capsys):
    """`--device cuda` here: simulated with this torch's kernels, the differences said; a measured plan needs the
    device, and says how to plan without it (exit 2)."""
    args = ["plan", "--model", "gpt", "--size", "tiny", "--device", "cuda", "--budget", "70%", "--cost", "flops"]
    assert main([*args, "--no-measure"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "no CUDA device here" in printed and "fused attention" in printed and "caching allocator" in printed
    assert main(args) == 2
    assert "add --no-measure" in capsys.readouterr().err
