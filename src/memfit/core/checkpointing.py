"""The checkpoint primitive: PyTorch's non-reentrant checkpoint, made state-safe.

`checkpoint(fn, *args, **kwargs)` runs `fn` without keeping its intermediate
activations and recomputes them in backward. It differs from
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` in three ways:

* module state (BatchNorm running statistics, `num_batches_tracked`, spectral
  norm's power-iteration vectors) is written once, by the forward, and never a
  second time by the recomputation (see NOTE [state replay]);
* in eval mode (when `fn` is a module or a module's method) and under
  `torch.no_grad()` it is a plain call;
* a region may span several calls (`Region`), which is how `segments:N` keeps
  only the input of a run of blocks that the model's own loop calls one by one.

Everything else is PyTorch's: kwargs, nested checkpoints, `torch.autograd.grad`,
double backward, the CPU and accelerator RNG replay that makes dropout exact,
and the autocast replay.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint as tuc
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _python_dispatch
from torch.utils._pytree import tree_flatten, tree_unflatten

from memfit.core import ondemand, pruning

__all__ = ["checkpoint", "Region"]


def checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` keeping only its inputs, and recompute its activations in backward.

    The gradients, the random numbers (dropout) and the module state written in the forward (BatchNorm's
    running statistics) are those of ``fn`` run without checkpointing (NOTE [state replay]). Under
    ``torch.no_grad()``, and in eval mode where ``fn`` is a module or a module's method, ``fn`` simply runs.

    Args:
        fn: the function or module to run, as ``fn(*args, **kwargs)``.
        *args: its positional arguments; tensors among them, also inside lists, tuples and dicts, are what
            the checkpoint keeps.
        **kwargs: its keyword arguments, all passed to ``fn``: none is reserved.

    Returns:
        What ``fn`` returns.
    """
    return run(fn, args, kwargs)


def run(fn, args, kwargs, policy=None, state_replay=True, training_only=True):
    """`checkpoint` with an optional selective policy: `policy()` returns a
    fresh policy function for each checkpointed call (`memfit.core.strategies.policy`).

    `state_replay=False` gives PyTorch's own semantics (buffers written again
    by the recompute), for comparison only. `training_only=False` recomputes
    in eval mode too (gradients of an eval-mode model: attribution).
    """
    if not will_recompute(fn, training_only):
        return fn(*args, **kwargs)
    if torch.compiler.is_compiling():  # dynamo traces torch's own checkpoint as one operator, not a Region
        if policy is None:
            return tuc.checkpoint(fn, *args, use_reentrant=False, **kwargs)
        # dynamo takes a partial of constants: `policy` was made outside the traced code, by `apply`
        context = functools.partial(_selective_contexts, policy)
        return tuc.checkpoint(fn, *args, use_reentrant=False, context_fn=context, **kwargs)
    if getattr(policy, "on_demand", False):  # NOTE [recompute on demand]
        return ondemand.run_on_demand(fn, args, kwargs, policy)
    region = Region(lambda a, kw: fn(*a, **kw), (args, kwargs), policy, owner=_owner(fn), state_replay=state_replay)
    try:
        out = fn(*args, **kwargs)
    except BaseException as e:
        region.fail(e)
        raise
    region.close()
    return out


def _selective_contexts(policy):
    return tuc.create_selective_checkpoint_contexts(policy(traced=True))


def will_recompute(fn, training_only=True) -> bool:
    """Checkpointing only happens where a backward can follow: grad mode, and a
    module (if `fn` is one or belongs to one) in training mode, unless
    `training_only` is False."""
    if not torch.is_grad_enabled():
        return False
    owner = _owner(fn)
    return owner is None or owner.training or not training_only


def _owner(fn):
    """The module `fn` is, or is a method of (bound, or `partial(Class.forward, module)`)."""
    if isinstance(fn, functools.partial) and fn.args:
        owner = fn.args[0]
    else:
        owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


# NOTE [state replay]
# PyTorch's checkpoint re-runs the region in backward, so a module that writes a
# buffer in its forward writes it twice: BatchNorm's running_mean/running_var move
# two momentum steps and num_batches_tracked counts 2 per step (pytorch#96136).
# While the region's forward runs, a global module pre-hook (this thread only)
# snapshots the buffers of every module the region calls, before that module
# first runs. When the forward ends, the snapshots of buffers the forward did
# not write are dropped. "Written" means the version counter moved or the
# values changed: BatchNorm's kernel updates running_mean/var in place without
# bumping their version counters, so the version alone misses them. During
# each recompute the written buffers are swapped for fresh copies of their
# snapshots, and swapped back after:
# the recompute sees exactly the state the forward saw (which matters for
# modules whose output depends on the state, like spectral norm), its writes
# land in copies that are thrown away, and the real buffers keep the values the
# forward gave them. The cost is a copy of the buffers of the modules in one
# region while it runs forward, and a copy of the written ones (for BatchNorm,
# 2 x channels floats) until backward.
# Limit: state written by plain functions, not held in a module's buffers
# (F.batch_norm on tensors the caller owns), is not seen.


def _written(buf, version, snapshot) -> bool:
    if buf._version != version:
        return True
    if buf.is_meta or isinstance(buf, FakeTensor):
        return True  # no data to compare in a simulated step: assume written
    return not torch.equal(buf, snapshot)


def _outside_policy():
    """Hide the snapshot's copies from a selective-checkpoint policy and the
    pruned recompute's record: they are not the block's ops, and would shift
    the numbers of the ops after them (NOTE [op-level modes] in
    memfit.core.strategies). The modes below (the memory tracker, fake tensors)
    still see them."""
    stack = contextlib.ExitStack()
    while isinstance(
        _python_dispatch._get_current_dispatch_mode(), (tuc._CachingTorchDispatchMode, pruning._Recording)
    ):
        stack.enter_context(_python_dispatch._pop_mode_temporarily())
    return stack


class _StateReplay:
    def __init__(self, owner):
        self._owner = owner
        self._thread = threading.get_ident()
        self._seen: dict = {}
        self._handle = None
        self.written: list = []  # (module, buffer name, snapshot)

    def _snapshot(self, module, args=None):
        if threading.get_ident() != self._thread:
            return
        with _outside_policy():
            for name, buf in module._buffers.items():
                key = (id(module), name)
                if buf is not None and key not in self._seen:
                    self._seen[key] = (module, name, buf, buf._version, buf.detach().clone())

    def enter_forward(self):
        if self._owner is not None:
            self._snapshot(self._owner)
        self._handle = nn.modules.module.register_module_forward_pre_hook(self._snapshot)

    def exit_forward(self):
        self._handle.remove()
        self.written = [(m, n, snap) for m, n, buf, v, snap in self._seen.values() if _written(buf, v, snap)]
        self._seen = {}

    def enter_recompute(self):
        self._live = [(m, n, m._buffers[n]) for m, n, _ in self.written]
        for m, n, snap in self.written:
            m._buffers[n] = snap.clone()

    def exit_recompute(self):
        for m, n, buf in self._live:
            m._buffers[n] = buf


class _Context:
    """A re-enterable context: a memfit hook around an optional torch context
    (the selective-checkpoint dispatch modes). Recompute may run more than once
    (retain_graph=True), so generator-based context managers would not do."""

    def __init__(self, enter, exit, inner):
        self._enter, self._exit, self._inner = enter, exit, inner

    def __enter__(self):
        self._enter()
        self._inner.__enter__()

    def __exit__(self, *exc):
        try:
            return self._inner.__exit__(*exc)
        finally:
            self._exit()


class _Nested:
    """Two re-enterable contexts, `outer` entered first."""

    def __init__(self, outer, inner):
        self._outer, self._inner = outer, inner

    def __enter__(self):
        self._outer.__enter__()
        try:
            self._inner.__enter__()
        except BaseException as e:
            self._outer.__exit__(type(e), e, e.__traceback__)
            raise

    def __exit__(self, *exc):
        try:
            return self._inner.__exit__(*exc)
        finally:
            self._outer.__exit__(*exc)


def _context_fn(owner, policy, state_replay=True):
    if not state_replay:
        if policy is None:
            return tuc.noop_context_fn
        return lambda: tuc.create_selective_checkpoint_contexts(policy())

    def context_fn():
        replay = _StateReplay(owner)
        if policy is None:
            fwd, rec = contextlib.nullcontext(), contextlib.nullcontext()
        else:  # the pruned recompute goes under the policy's modes (NOTE [pruned recompute])
            policy_fn = policy()
            fwd, rec = tuc.create_selective_checkpoint_contexts(policy_fn)
            if hasattr(fwd, "respect_saved_tensors_hooks"):  # NOTE [torch's generator]: torch 2.14 and later
                fwd.respect_saved_tensors_hooks = False
            pruner = pruning.Pruner(policy_fn, fwd.storage)
            fwd, rec = _Nested(pruner.forward, fwd), _Nested(pruner.recompute, rec)
        return (
            _Context(replay.enter_forward, replay.exit_forward, fwd),
            _Context(replay.enter_recompute, replay.exit_recompute, rec),
        )

    return context_fn


# NOTE [torch's generator]
# `torch.utils.checkpoint._checkpoint_without_reentrant_generator` is private
# and its signature changes between releases: up to 2.13 it is
# `(fn, preserve_rng_state, context_fn, determinism_check, debug[, early_stop], *args, **kwargs)`;
# on torch's main branch (the release after 2.13) it is
# `(fn, args, kwargs, *, preserve_rng_state, context_fn, determinism_check, debug, early_stop)`.
# `_binding` recognises both and says so at import if it meets a third.
# From 2.14 it also takes `respect_saved_tensors_hooks`: whether the tensors a
# selective checkpoint saves go through the saved-tensor hooks around it. The
# hook around memfit's selective regions is its own (the pruned recompute's
# observer, NOTE [pruned recompute] in memfit.core.pruning), which must see only
# what autograd saves, as it always has; so memfit passes False, where torch
# would warn that its default is about to change. Where memfit wraps the
# selective contexts in its own (`_context_fn`), torch cannot reach them to
# say so, and memfit sets it on the caching mode itself.


def _binding(generator):
    """A function `open(fn, args, context_fn)` that starts `generator` for either signature."""
    params = list(inspect.signature(generator).parameters.values())
    names = [p.name for p in params]
    legacy = {"respect_saved_tensors_hooks": False} if "respect_saved_tensors_hooks" in names else {}
    if (
        names[:3] == ["fn", "args", "kwargs"]
        and "context_fn" in names
        and all(p.kind is p.KEYWORD_ONLY for p in params[3:])
    ):
        return lambda fn, args, context_fn: generator(
            fn, tuple(args), {}, preserve_rng_state=True, context_fn=context_fn, **legacy
        )
    head = list(itertools.takewhile(lambda p: p.kind is p.POSITIONAL_OR_KEYWORD, params))
    if (
        names[:1] == ["fn"]
        and any(p.kind is p.VAR_POSITIONAL for p in params)
        and {"preserve_rng_state", "context_fn"} <= set(names[: len(head)])
        and all(p.default is not p.empty for p in head[1:])
    ):

        def open_(fn, args, context_fn):
            values = {"fn": fn, "context_fn": context_fn, "preserve_rng_state": True}
            return generator(*[values.get(p.name, p.default) for p in head], *args, **legacy)

        return open_
    raise ImportError(
        f"memfit does not know the checkpoint generator of torch {torch.__version__} "
        f"(signature {inspect.signature(generator)}); use torch 2.8 to 2.13, or a memfit that "
        f"supports torch {torch.__version__}."
    )


_open = _binding(tuc._checkpoint_without_reentrant_generator)


def _top_hooks():
    """The saved-tensor hooks on top of this thread's stack (pack, unpack), or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


class CallState:
    """The RNG and autocast state a call saw, to recompute it under the same.

    NOTE [per-call replay]: torch's checkpoint restores the RNG and autocast
    state of the region's start once, before its recompute. A segment
    recomputes several calls back to back, while the model's own loop may have
    drawn random numbers between them (LayerDrop: `if torch.rand([]) < p:
    continue`) or changed autocast; each call of a segment is therefore
    recomputed under the state it saw itself."""

    def __init__(self, tensors):
        self.cpu_rng = torch.get_rng_state()
        self.device_type = next((t.device.type for t in tensors if t.device.type not in ("cpu", "meta")), "cpu")
        module = getattr(torch, self.device_type, None) if self.device_type != "cpu" else None
        self.devices, self.states = [], []
        if module is not None and getattr(module, "_initialized", False):
            self.devices, self.states = tuc.get_device_states(*tensors)
        kinds = dict.fromkeys([self.device_type, "cpu"])
        self.autocast = [
            (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
            for d in kinds
            if torch.amp.is_autocast_available(d)
        ]
        self.autocast_cache = torch.is_autocast_cache_enabled()

    @contextlib.contextmanager
    def restored(self):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self.devices, device_type=self.device_type))
            torch.set_rng_state(self.cpu_rng)
            if self.devices:
                tuc.set_device_states(self.devices, self.states, device_type=self.device_type)
            for kind, enabled, dtype in self.autocast:
                stack.enter_context(
                    torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=self.autocast_cache)
                )
            yield


class Region:
    """A checkpointed region opened before a call and closed after a later one.

    `replay(*args)` must recompute, from the region's inputs `args`, every
    tensor the region saved for backward: for one call it is the called
    function, for a segment it runs the segment's calls in order.

    NOTE: this drives `torch.utils.checkpoint._checkpoint_without_reentrant_generator`,
    the generator that `torch.utils.checkpoint.checkpoint` itself is built on
    (it yields once before the forward and once after). Using it directly lets
    a region span several `forward` calls issued by the model's own loop.
    Between those calls the region can be paused: its saved-tensor hooks come
    off the thread's stack, so what the loop does between blocks is saved by
    autograd as usual, not recorded in the region (see NOTE [segments] in
    `memfit.core.wrapping`).

    `owner` is the module whose forward opens the region: its own buffers are
    snapshotted too, since its pre-hooks ran before the region opened.

    NOTE [inputs changed after the call]
    A model may change a container it passed to a block once the block has
    returned: torchvision's DenseNet passes each dense layer the list of all
    features so far, then appends the layer's output to that same list. A
    recompute that called the block with that list would see one more tensor
    than the forward did (and fail, or compute something else). The region's
    inputs are therefore flattened when it opens (lists, tuples, dicts:
    `torch.utils._pytree`), torch's generator keeps the tensors as it keeps
    any input (with their version checks), and the recompute rebuilds fresh
    containers as they were at the call. Segments do the same for each later
    call's extra arguments (`memfit.core.wrapping._Call`).
    """

    def __init__(self, replay, args, policy=None, owner=None, state_replay=True):
        leaves, spec = tree_flatten(tuple(args))  # NOTE [inputs changed after the call]
        self._gen = _open(
            lambda *flat: replay(*tree_unflatten(list(flat), spec)), leaves, _context_fn(owner, policy, state_replay)
        )
        next(self._gen)
        self._hooks = _top_hooks() if torch.is_grad_enabled() else None
        self.paused = False

    def pause(self):
        """Take the region's saved-tensor hooks off the stack until `resume`."""
        if _top_hooks() != self._hooks:
            raise RuntimeError(
                "memfit: the saved-tensor hooks on top are not the checkpoint region's; "
                "something inside a block left its own hooks installed."
            )
        torch._C._autograd._pop_saved_tensors_default_hooks()
        self.paused = True

    def resume(self):
        torch._C._autograd._push_saved_tensors_default_hooks(*self._hooks)
        self.paused = False

    def close(self):
        if self.paused:
            self.resume()
        try:
            next(self._gen)
        except StopIteration:
            return
        raise AssertionError("torch's checkpoint generator yielded more than twice")

    def fail(self, exc):
        """Close the region after `exc` was raised inside it."""
        if self.paused:
            self.resume()
        try:
            self._gen.throw(exc)
        except BaseException as e:
            if e is not exc:
                raise
