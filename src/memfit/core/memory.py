"""Peak memory of a training step, the same kind of number on every device.

    with memfit.track_memory(model, optimizer, batch) as mem:
        loss_fn(model(batch)).backward(); optimizer.step()
    mem.peak_bytes, mem.activation_bytes, mem.static_bytes, mem.source

The number is bytes of live tensor storage.

* CUDA: the caching allocator (`torch.cuda.max_memory_allocated`), reset on
  entry. Static bytes are everything allocated on the device at entry.
* Any other device (CPU, MPS, meta): a dispatch-level tracker. Every storage an
  op creates is counted when it appears and uncounted when it dies (a weakref
  on the storage, whose Python object PyTorch keeps alive exactly as long as
  the storage). Static bytes are the storages of the objects passed in
  (modules: parameters, buffers, gradients; optimizers: their state; tensors and
  containers of them). The same step gives the same peak, to the byte, on
  every run and at any thread count.

NOTE [compiled code]
Dynamo runs a compiled graph only when no dispatch mode is active that asks
to see every op, and falls back to eager code otherwise. The storage counter
says `ignore_compile_internals`: it is off while torch.compile traces and
compiles, and on while the compiled code runs. So it sees what a compiled
step really allocates where the compiled code calls aten ops (the
`aot_eager` backends: to the byte, tested against allocator events), and
it passes the higher-order ops of compiled code (`run_and_save_rng_state`)
through. Inductor's CPU kernels allocate their buffers without an op the
dispatcher sees, so for them `track_memory(..., allocator_events=True)`
reads the CPU allocator's events from `torch.profiler` instead (source
`EVENTS_SOURCE`): static bytes as above, plus the highest rise of
allocations over frees; it finds no end of the forward.

The end of the forward is found without help: it is the moment the autograd
engine runs its first op. `forward_end_bytes` is what was live then, and
`activation_bytes` is that minus the static bytes: what the forward kept for
backward (plus the loss and outputs).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass,
)
from torch.utils._pytree import tree_leaves

__all__ = ["track_memory", "MemoryTracker", "CPU_SOURCE", "CUDA_SOURCE"]

CPU_SOURCE = "storage-tracker"
CUDA_SOURCE = "cuda-allocator"
EVENTS_SOURCE = "cpu-allocator events (torch.profiler)"


GB = 1e9  # the unit of the memory numbers trainers log


def fmt_bytes(n: float) -> str:
    """`n` bytes for a reader: B, KiB, MiB or GiB."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@dataclass
class MemoryTracker:
    """What `track_memory` measured. All sizes in bytes."""

    source: str
    device: str
    static_bytes: int = 0
    peak_bytes: int = 0
    forward_end_bytes: int | None = None
    end_bytes: int = 0
    # (label, live bytes): one point per op on the storage tracker ("forward",
    # "backward", "other"); on CUDA the entry, forward end, marks and exit.
    timeline: list = field(default_factory=list)

    @property
    def activation_bytes(self) -> int | None:
        """Bytes live at the end of the forward beyond the static ones (None where the source cannot say)."""
        return (self.forward_end_bytes if self.forward_end_bytes is not None else self.end_bytes) - self.static_bytes

    def mark(self, label: str) -> None:
        """Add a labelled point to the timeline, with the bytes live now."""
        self.timeline.append((label, self._live()))

    def _live(self) -> int:  # overridden by the implementations
        raise NotImplementedError


class _StorageCounter(TorchDispatchMode):
    """Counts the storages ops create. NOTE: FSDP2 frees and re-allocates its
    gathered parameters with `UntypedStorage.resize_`, which no op dispatch
    sees, so `resize_` is wrapped while the counter is active. Compiled code
    runs under it: NOTE [compiled code]."""

    supports_higher_order_operators = True

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __init__(self, tracker: _TrackerCPU):
        super().__init__()
        self.t = tracker

    def __enter__(self):
        resize, t = torch.UntypedStorage.resize_, self.t

        def resize_(storage, size):
            out = resize(storage, size)
            t.resized(storage, storage.nbytes())
            return out

        self._resize = resize
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        t = self.t
        backward = _in_backward()
        if backward and t.forward_end_bytes is None:
            t.forward_end_bytes = t.live  # before this op's outputs are counted
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor):
                t.add(x)
        t.timeline.append(("backward" if backward else "forward" if t.forward_end_bytes is None else "other", t.live))
        return out


@dataclass
class _TrackerCPU(MemoryTracker):
    live: int = 0

    def __post_init__(self):
        self._device = torch.device(self.device)
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def add(self, tensor: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(tensor):  # a DTensor (FSDP2): count the shard this rank holds
            for name in tensor.__tensor_flatten__()[0]:
                inner = getattr(tensor, name)
                if isinstance(inner, torch.Tensor):
                    self.add(inner)
            return
        if tensor.device != self._device:  # e.g. a CUDA model's tensors offloaded to the CPU
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        n = storage.nbytes()
        self._sizes[key] = n
        self._refs[key] = weakref.ref(storage, functools.partial(self._freed, key))
        self.live += n
        if self.live > self.peak_bytes:
            self.peak_bytes = self.live

    def _freed(self, key: int, _ref: object) -> None:
        self.live -= self._sizes.pop(key)
        del self._refs[key]

    def resized(self, storage, nbytes: int) -> None:
        key = id(storage)
        if key in self._sizes:
            self.live += nbytes - self._sizes[key]
            self._sizes[key] = nbytes
            self.peak_bytes = max(self.peak_bytes, self.live)

    def _live(self) -> int:
        return self.live


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 points at /dev/null inside (what C++ code prints there is dropped)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


@dataclass
class _TrackerEvents(MemoryTracker):
    """The CPU allocator's events, read from `torch.profiler` (NOTE [compiled code])."""

    live: int = 0

    @property
    def activation_bytes(self) -> None:
        return None  # the events do not show where the forward ends

    def start(self):
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():  # kineto prints a line to stderr at each start and stop
            self._profile.__enter__()

    def stop(self):
        with _quiet_stderr():
            self._profile.__exit__(None, None, None)
        events = sorted(
            (
                e
                for e in self._profile.profiler.kineto_results.events()
                if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
            ),
            key=lambda e: e.start_ns(),
        )
        live = 0
        for e in events:
            live += e.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.static_bytes + live)
        self.live = self.static_bytes + live
        del self._profile

    def _live(self) -> int:
        return self.live


@dataclass
class _TrackerCUDA(MemoryTracker):
    def _live(self) -> int:
        return torch.cuda.memory_allocated(self.device)


class _ForwardEnd(TorchDispatchMode):
    """Reads the allocator once, at the first op the autograd engine runs."""

    supports_higher_order_operators = True

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __init__(self, tracker: _TrackerCUDA):
        super().__init__()
        self.t = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.t.forward_end_bytes is None and _in_backward():
            self.t.forward_end_bytes = self.t._live()
            self.t.timeline.append(("forward end", self.t.forward_end_bytes))
        return func(*args, **(kwargs or {}))


def static_tensors(*objects):
    """The tensors held by modules (parameters, buffers, gradients), optimizers
    (state) and (nested containers of) tensors."""
    out = []
    for obj in objects:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                out.append(p)
                if p.grad is not None:
                    out.append(p.grad)
            out.extend(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            out.extend(x for x in tree_leaves(list(obj.state.values())) if isinstance(x, torch.Tensor))
        else:
            out.extend(x for x in tree_leaves(obj) if isinstance(x, torch.Tensor))
    return out


class track_memory:
    """Context manager measuring the peak memory of what runs inside it; `with track_memory(model, opt) as mem:`
    gives a `MemoryTracker` whose numbers are filled in when the block ends.

    Args:
        *objects: modules (parameters, buffers, gradients), optimizers (their state) and tensors (nested in
            containers too) whose bytes count as static on the storage tracker; on CUDA everything allocated
            at entry does.
        device: the device to measure; by default that of the first tensor among `objects`, else the CPU.
            On CUDA the allocator's `max_memory_allocated` is read; elsewhere every storage created is
            counted (the storage tracker, exact to the byte on the CPU).
        storage_tracker: count storages on CUDA too (simulated steps have no allocator).
        allocator_events: on the CPU, read the allocator's events from `torch.profiler` instead (for
            inductor's compiled code, which the storage tracker cannot see: NOTE [compiled code]).
    """

    def __init__(
        self,
        *objects: object,
        device: str | torch.device | None = None,
        storage_tracker: bool = False,
        allocator_events: bool = False,
    ):
        tensors = static_tensors(*objects)
        self._storage_tracker = storage_tracker  # also on CUDA (simulated steps have no allocator)
        self._events = allocator_events  # on the CPU, for inductor's compiled code (NOTE [compiled code])
        if device is None:
            device = tensors[0].device if tensors else torch.device("cpu")
        self.device = torch.device(device)
        self._tensors = tensors
        self._mode: contextlib.AbstractContextManager = contextlib.nullcontext()

    def __enter__(self) -> MemoryTracker:
        t: MemoryTracker
        if self.device.type == "cuda" and not self._storage_tracker:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            cuda = _TrackerCUDA(CUDA_SOURCE, str(self.device))
            cuda.static_bytes = cuda.peak_bytes = cuda._live()
            t, self._mode = cuda, _ForwardEnd(cuda)
        elif self._events and self.device.type == "cpu":
            events = _TrackerEvents(EVENTS_SOURCE, str(self.device))
            events.static_bytes = events.peak_bytes = events.live = storage_bytes(self._tensors)
            t, self._mode = events, contextlib.nullcontext()
        else:
            cpu = _TrackerCPU(CPU_SOURCE, str(self.device))
            for x in self._tensors:
                cpu.add(x)
            cpu.static_bytes = cpu.live
            t, self._mode = cpu, _StorageCounter(cpu)
        del self._tensors
        t.timeline.append(("start", t.static_bytes))
        self.tracker = t
        self._mode.__enter__()
        if isinstance(t, _TrackerEvents):
            t.start()
        return t

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        t = self.tracker
        if isinstance(t, _TrackerEvents):
            t.stop()
        if isinstance(t, _TrackerCUDA):
            torch.cuda.synchronize(self.device)
            t.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        t.end_bytes = t._live()
        t.timeline.append(("end", t.end_bytes))
        return False


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors`."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[id(s)] = s.nbytes()
    return sum(seen.values())


def available_cpu_bytes() -> int:
    """Memory the host can still give (MemAvailable), or a large number where it cannot say."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`, minus a 10% safety margin."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_allocated(device)  # what this process holds is ours to plan with
    else:
        free = available_cpu_bytes()
    return int(free * 0.9)
