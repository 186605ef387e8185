"""Recompute on demand: the op-level modes in eager mode, without re-running the block.

NOTE [recompute on demand]
torch's checkpoint recomputes a block by running its forward again at the
first unpack, and everything the rerun makes stays until backward has used
it: a block's recomputed activations are all live at once at the start of
its backward. torch.compile's partitioner instead recomputes each tensor
just before the backward op that needs it. This does the same in eager
mode, for the `lazy:NAME@K` modes (the `ops:` modes' twins, NOTE [op-level
frontier] in memfit.planning.frontier):

While the block's forward runs, a dispatch mode (`_Recorder`) records each
op: its function and arguments, each tensor argument named by the op that
made it (`_Ref`) or, when no op of the block did, held as itself (the
block's inputs, parameters, constants). An op's outputs are held when the
mode's policy saves it, and always when replaying it could differ from the
forward: it draws random numbers, writes a tensor in place, makes memory
it does not write (`empty` and its kind: a kernel the dispatcher does not
see may fill it), is not an aten op (collectives, custom ops) or runs on a
tensor subclass. Autograd's pack hook then stores, for a tensor an op that
is not held made, a `_Lazy` handle instead of the tensor, which the forward
frees as soon as nothing else holds it. The unpack hook evaluates the
handle: the op again, on its arguments, themselves evaluated the same way
down to held tensors. An op that several handles need is evaluated once
and kept only until the last of them is unpacked (`uses`).

Never wrong, only slower or refused:
* random ops are held, never replayed, so nothing depends on the generator;
  nor does module state: BatchNorm's running statistics are written in
  place (undeclared by `native_batch_norm`'s schema: any batch-norm op is
  held), so its op runs once;
* the replay runs with autocast off (the recorded ops are below it, casts
  included) and under no_grad: autograd gives an unpacked tensor its
  history back, so a backward with create_graph=True differentiates it;
* each tensor a replay reads records its version counter when it is
  recorded. An op of the block that writes in place a tensor some handle's
  replay reads first makes that handle keep its tensor (`hold`: the tensor
  itself while it is alive, else evaluated then); a handle made after such a
  write keeps its tensor from the start. A tensor written in place after
  its op made it (through a view too: `y[:, :k].mul_(2)` bumps `y`'s
  version) is held wherever a later op reads it, and kept by autograd as
  itself: replaying its op would give the value before the write (the model
  fuzzer found this, tests/test_fuzz.py). A tensor written after the block's
  forward (the recorder is gone) makes the unpack raise instead, as autograd
  does for a saved tensor written in place;
* under torch.compile the block goes through torch's checkpoint with the
  policy, as its `ops:` twin (NOTE [op-level modes under compile] in
  memfit.core.strategies): the partitioner interleaves recompute by itself.
What is assumed, as the pruned recompute assumes (NOTE [pruned recompute]):
an op's output depends only on its arguments; a kernel that writes a tensor
without the dispatcher seeing it (a raw Triton or C++ launch into a tensor
made by `zeros`) would not be replayed.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.utils.checkpoint as tuc
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from memfit.core import pruning, strategies

_PLAIN = (torch.Tensor, torch.nn.Parameter, FakeTensor)
_CONTEXT = tuc.SelectiveCheckpointContext(is_recompute=False)
_SAVE = (tuc.CheckpointPolicy.MUST_SAVE, tuc.CheckpointPolicy.PREFER_SAVE, True)


class _Node:
    """One recorded op: its outputs if held, else how to make them again."""

    __slots__ = ("func", "args", "kwargs", "held", "value", "uses", "__weakref__")

    def __init__(self, func, args, kwargs, held):
        self.func, self.args, self.kwargs = func, args, kwargs
        self.held, self.value, self.uses = held, held, 0


class _Ref:
    __slots__ = ("node", "index", "version")

    def __init__(self, node, index, version):
        self.node, self.index, self.version = node, index, version


class _Lazy:
    """What autograd keeps for a tensor a replayable op made: how to make it, or, once `hold` ran, the tensor."""

    __slots__ = ("ref", "ancestors", "tensor", "value", "__weakref__")

    def __init__(self, ref, tensor):
        self.ref, self.tensor, self.value = ref, weakref.ref(tensor), None
        self.ancestors = _replayed(ref.node)
        for node in self.ancestors:
            node.uses += 1

    def reads(self) -> list:
        """The held tensors a replay reads, with the version each had when read: [(tensor, version)]."""
        return [
            (r.node.held[r.index], r.version)
            for n in self.ancestors
            for r in _refs((n.args, n.kwargs))
            if r.node.held is not None and isinstance(r.node.held[r.index], torch.Tensor)
        ]

    def hold(self):
        """Keep the tensor itself from now on: what a replay reads is about to be written in place."""
        alive = self.tensor()
        if alive is None:
            self.value = _unpack(self)
        else:
            self.value = alive
            self.release()

    def release(self):
        for node in self.ancestors:
            node.uses -= 1
            if node.uses <= 0:
                node.value = None


def _replayed(node) -> list:
    """The ops, not held, that evaluating `node` runs: itself and what it reads, down to held tensors."""
    seen, todo = {}, [node]
    while todo:
        n = todo.pop()
        if n.held is None and id(n) not in seen:
            seen[id(n)] = n
            todo += [a.node for a in _refs((n.args, n.kwargs))]
    return list(seen.values())


def _refs(tree) -> list:
    if isinstance(tree, _Ref):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [r for x in tree for r in _refs(x)]
    if isinstance(tree, dict):
        return [r for x in tree.values() for r in _refs(x)]
    return []


def _version(t):
    return t._version if isinstance(t, torch.Tensor) and not t.is_inference() else None


def _replayable(func, args, kwargs, out) -> bool:
    if not isinstance(func, torch._ops.OpOverload) or func.namespace not in ("aten", "prims"):
        return False
    if (
        func in pruning.UNINITIALISED
        or strategies.draws_random(func, args, kwargs)
        or pruning.written(func, args, kwargs)
        or "batch_norm" in func._schema.name
    ):  # native_batch_norm writes undeclared
        return False
    return all(type(t) in _PLAIN for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))


class _Recorder(TorchDispatchMode):
    """Records a block's forward (NOTE [recompute on demand]); `made` maps each tensor to the op that made it."""

    def __init__(self, policy_fn):
        super().__init__()
        self.policy_fn, self.made, self.handles = policy_fn, WeakTensorKeyDictionary(), weakref.WeakSet()

    def _arg(self, a):
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        if isinstance(a, torch.Tensor) and a in self.made:
            node, index, version = self.made[a]
            if _version(a) == version:
                return _Ref(node, index, version)
        if isinstance(a, torch.Tensor):  # a tensor from outside, or written in place since its op made it: held
            return _Ref(_Node(None, (), {}, [a]), 0, _version(a))
        return a

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = {id(t.untyped_storage()) for t in pruning.written(func, args, kwargs)}
        if written:  # a handle whose replay reads what this op writes keeps its tensor instead
            for handle in list(self.handles):
                if any(id(t.untyped_storage()) in written for t, _ in handle.reads()):
                    handle.hold()
                    self.handles.discard(handle)
        out = func(*args, **kwargs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        save = func not in pruning.IGNORED and self.policy_fn(_CONTEXT, func, *args, **kwargs) in _SAVE
        if not any(isinstance(o, torch.Tensor) for o in outs):
            return out
        held = outs if save or not _replayable(func, args, kwargs, out) else None
        node = _Node(func, self._arg(list(args)), {k: self._arg(v) for k, v in kwargs.items()}, held)
        for i, o in enumerate(outs):
            if isinstance(o, torch.Tensor):
                self.made[o] = (node, i, _version(o))
        return out

    def pack(self, t):
        found = self.made.get(t) if self.made is not None else None
        if found is None or found[0].held is not None or _version(t) != found[2]:
            return t
        handle = _Lazy(_Ref(found[0], found[1], _version(t)), t)
        if any(_version(x) != v for x, v in handle.reads()):  # written in place already: keep the tensor
            handle.release()
            return t
        self.handles.add(handle)
        return handle


def _unpack(x):
    if not isinstance(x, _Lazy):
        return x
    if x.value is not None:
        return x.value
    with contextlib.ExitStack() as stack:  # autograd gives the tensor its history back: no graph to build
        stack.enter_context(torch.no_grad())
        for device in ("cpu", "cuda"):
            if torch.amp.is_autocast_available(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        try:
            return _evaluate(x.ref)
        finally:
            x.release()


def _evaluate(ref):
    node = ref.node
    if node.value is None:
        args = [_argument(a) for a in node.args]
        out = node.func(*args, **{k: _argument(v) for k, v in node.kwargs.items()})
        node.value = list(out) if isinstance(out, (tuple, list)) else [out]
    return node.value[ref.index]


def _argument(a):
    if isinstance(a, (list, tuple)):
        return type(a)(_argument(x) for x in a)
    if not isinstance(a, _Ref):
        return a
    value = _evaluate(a)
    if a.node.held is not None and _version(value) != a.version:
        raise RuntimeError(
            "memfit: a tensor that recomputing on demand reads was written in place after the "
            "forward read it; apply this block with a preset mode (blocks, selective) instead."
        )
    return value


def run_on_demand(fn, args, kwargs, policy):
    """`fn(*args, **kwargs)`, its activations recomputed on demand under `policy` (`memfit.core.strategies.policy`)."""
    recorder = _Recorder(policy())
    try:
        with torch.autograd.graph.saved_tensors_hooks(recorder.pack, _unpack), recorder:
            return fn(*args, **kwargs)
    finally:
        recorder.made, recorder.handles = None, ()  # the handles hold what they need; the record goes
