"""The storage tracker: exact, repeatable, and in agreement with PyTorch's MemTracker."""

import copy

import pytest
import torch
from torch import nn

import memfit
from memfit.core.memory import CPU_SOURCE, track_memory
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
        a = torch.empty(250, dtype=torch.float32)  # 1000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4000 bytes
        del a
        c = b[:10]  # a view: no new storage
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
        y = torch.relu(lin(x))  # relu keeps its 50x100 output; the linear output dies
        y.sum().backward()
    assert mem.forward_end_bytes is not None
    assert 50 * 100 * 4 <= mem.activation_bytes <= 50 * 100 * 4 + 16  # plus the scalar sum


def test_a_storage_resized_in_place_counts_at_its_new_size():
    """FSDP2 frees and gathers its parameters with `UntypedStorage.resize_`, which no op dispatch sees: the
    tracker counts a storage it knows at each new size, and leaves the others (made before it started) alone."""
    before = torch.zeros(100)
    with track_memory(device="cpu") as mem:
        x = torch.zeros(1000)  # 4000 bytes
        x.untyped_storage().resize_(0)  # freed in place, as FSDP2 frees a gathered parameter
        freed = mem.live
        x.untyped_storage().resize_(2000)  # gathered again, larger
        before.untyped_storage().resize_(0)  # not the tracker's: not counted
        at_end = mem.live
        del x
    assert (freed, at_end, mem.peak_bytes, mem.end_bytes) == (0, 2000, 4000, 0)
    resize = torch.UntypedStorage.resize_
    with track_memory(device="cpu") as mem:
        y = torch.zeros(1000)
        y.untyped_storage().resize_(8000)  # above what it had: a new peak
    assert mem.peak_bytes == 8000 and torch.UntypedStorage.resize_ is resize  # and put back as it was


def test_static_bytes_count_each_storage_once():
    """What counts as static: parameters, their gradients, buffers, optimizer state and the batch's tensors, each
    storage once however many views of it are given."""
    from memfit.core.memory import static_tensors, storage_bytes

    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))  # 15 + 6 parameters, 7 buffer elements
    model(torch.randn(5, 4)).sum().backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    batch = {"x": torch.zeros(10), "views": [torch.zeros(10)[2:], torch.zeros(3).view(3, 1)]}
    params, grads, buffers = 21 * 4, 21 * 4, 6 * 4 + 8
    state = 2 * 21 * 4 + 4 * 4  # exp_avg, exp_avg_sq, and a step count per parameter
    assert storage_bytes(static_tensors(model)) == params + grads + buffers
    assert storage_bytes(static_tensors(opt)) == state
    assert storage_bytes(static_tensors(batch)) == 40 + 40 + 12
    a = torch.zeros(10)
    assert storage_bytes([a, a[2:], a.view(2, 5), torch.zeros(3)]) == 40 + 12
    with track_memory(model, opt, batch, a) as mem:
        pass
    assert mem.static_bytes == params + grads + buffers + state + 40 + 40 + 12 + 40


def test_a_tensor_subclass_counts_the_tensors_it_holds():
    """A traceable wrapper subclass (FSDP2's DTensor holds this rank's shard) counts as the storages inside it:
    given as a static object, and as the output of an op (the tracker sees the op on the subclass, not the ops
    inside it)."""
    from torch.testing._internal.two_tensor import TwoTensor

    held = TwoTensor(torch.zeros(10), torch.zeros(10))  # two storages of 40 bytes, inside one tensor
    with track_memory(held, device="cpu") as mem:
        doubled = held * 2  # another two
        live = mem.live
        del doubled
    assert (mem.static_bytes, live, mem.peak_bytes, mem.end_bytes) == (80, 160, 160, 80)


def test_the_timeline_says_forward_backward_and_after():
    """One point per op, labelled by where the step is: the forward, the backward (its first op marks the end
    of the forward), then what follows (the optimizer), between the start and the end."""
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with track_memory(lin, x) as mem:
        lin(x).square().sum().backward()
        mem.mark("backward done")
        torch.zeros(3)
    labels = [label for label, _ in mem.timeline]
    assert labels[0] == "start" and labels[-1] == "end" and "backward done" in labels
    ops = [label for label in labels if label in ("forward", "backward", "other")]
    assert ops == sorted(ops, key=["forward", "backward", "other"].index) and len(set(ops)) == 3
    assert mem.timeline[-1][1] == mem.end_bytes and max(v for _, v in mem.timeline) == mem.peak_bytes
