"""The storage tracker: exact, repeatable, and in agreement with PyTorch's MemTracker."""
import copy

import pytest
import torch
from torch import nn

import memfit
from memfit.memory import CPU_SOURCE, track_memory
from memfit.models import REGISTRY


def train_step(model, opt, batch, loss_fn):
    opt.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    opt.step()


def measured(model, batch, loss_fn):
    opt = torch.optim.AdamW(model.parameters())
    train_step(model, opt, batch, loss_fn)  # creates the optimizer state
    torch.manual_seed(0)
    with track_memory(model, opt, batch) as mem:
        train_step(model, opt, batch, loss_fn)
    return mem


def test_known_allocations_to_the_byte():
    keep = torch.zeros(1000)
    with track_memory(keep) as mem:
        a = torch.empty(250, dtype=torch.float32)   # 1000 bytes
        b = torch.empty(500, dtype=torch.float64)   # 4000 bytes
        del a
        c = b[:10]                                  # a view: no new storage
        del b, c
    assert mem.source == CPU_SOURCE
    assert mem.static_bytes == 4000
    assert mem.peak_bytes == 4000 + 1000 + 4000
    assert mem.end_bytes == 4000


def test_only_the_tracked_device_counts():
    with track_memory(device="cpu") as mem:
        elsewhere = torch.empty(1000, device="meta")  # stands for a CUDA tensor's copy elsewhere
        here = torch.empty(250)
        del elsewhere, here
    assert mem.peak_bytes == 1000


def test_same_peak_on_every_run_and_thread_count():
    model, batch, loss_fn = REGISTRY["gpt"].build("tiny")
    threads = torch.get_num_threads()
    peaks = []
    for n in (1, threads, 1):
        torch.set_num_threads(n)
        peaks.append(measured(copy.deepcopy(model), batch, loss_fn).peak_bytes)
    torch.set_num_threads(threads)
    assert peaks[0] == peaks[1] == peaks[2]


def test_agrees_with_pytorch_mem_tracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    model, batch, loss_fn = REGISTRY["gpt"].build("tiny")
    opt = torch.optim.AdamW(model.parameters())
    train_step(model, opt, batch, loss_fn)
    with track_memory(model, opt) as ours:
        train_step(model, opt, batch, loss_fn)
    theirs = MemTracker()
    theirs.track_external(model, opt)
    with theirs:
        train_step(model, opt, batch, loss_fn)
    peak = sum(v["Total"] for v in theirs.get_tracker_snapshot("peak").values())
    assert abs(ours.peak_bytes - peak) <= 0.01 * peak


@pytest.mark.parametrize("name", ["gpt", "resnet-se"])
def test_checkpointing_shows_as_less_kept_for_backward(name):
    model, batch, loss_fn = REGISTRY[name].build("tiny", batch_size=8)
    plain = measured(copy.deepcopy(model), batch, loss_fn)
    ckpt = measured(memfit.apply(copy.deepcopy(model), "blocks"), batch, loss_fn)
    assert plain.static_bytes == ckpt.static_bytes
    assert ckpt.activation_bytes < 0.6 * plain.activation_bytes
    assert ckpt.peak_bytes < plain.peak_bytes
    labels = [label for label, _ in ckpt.timeline]
    assert labels[0] == "start" and labels[-1] == "end" and "backward" in labels
    assert max(live for _, live in ckpt.timeline) == ckpt.peak_bytes


def test_forward_end_is_found_without_help():
    lin = nn.Linear(100, 100)
    x = torch.randn(50, 100)
    with track_memory(lin, x) as mem:
        y = torch.relu(lin(x))   # relu keeps its 50x100 output; the linear output dies
        y.sum().backward()
    assert mem.forward_end_bytes is not None
    assert 50 * 100 * 4 <= mem.activation_bytes <= 50 * 100 * 4 + 16  # plus the scalar sum
