"""A selective recompute that runs only the ops backward needs.

NOTE [pruned recompute]
torch's checkpoint recomputes a block by running its forward again: every op
it did not save runs, in program order, up to the last one whose output
backward needs (its early stop). An op whose output nothing needs still runs:
with Llama's residual sum `h = x + o_proj(attn)` saved, `o_proj` is
recomputed only to be added to a sum that comes from the cache. The
min-cut partitioner of torch.compile recomputes only what backward needs;
this brings that to eager mode, for every block with a selective policy (the
presets and the op-level modes).

While the block's forward runs, a dispatch mode under the selective-
checkpoint mode records, op by op, which storages each op reads and which
ops wrote them (`Dataflow`), and a saved-tensor hook records which storages
autograd saves. When the forward ends, `skipped` walks back from what
autograd saved, through the ops the recompute runs (not the ones it takes
from the cache), to the ops it needs; the others are skipped in the
recompute: a skipped op returns tensors of its output's shape, strides and
dtype, allocated and never written (placeholders), found from its meta
kernel. The decision rests on the forward of this very call, not on a
profile, and the recompute must take the forward's path anyway (torch checks
the shapes of what it recomputes).

Never wrong, only slower:
* only ops that make new tensors and draw no random numbers are skipped, and
  in-place ops on the block's own tensors (whose targets then count as
  placeholders); random ops always run, so the generator advances as in the
  forward;
* while recomputing, an op that reads a placeholder (other than a view or a
  metadata query), or a placeholder that autograd would save, raises: a
  recompute that takes another path than its forward fails loudly;
* the recompute checks each op's name against the forward's, and skips
  nothing more once they differ;
* a forward in which an op reads memory from `empty` (or its kind) that no
  op the dispatcher saw has written (a kernel outside it may have: its reads
  are unseen), or that runs on tensor subclasses, is not pruned at all;
* under torch.compile nothing here runs: the partitioner prunes by itself.

NOTE [in-place writes to saved tensors]
A block may write in place a tensor its policy saved: timm's squeeze-excite
runs `SiLU(inplace=True)` on a convolution's output, a ResNet without
BatchNorm does `out += identity` after its last convolution, torchvision
and timm do this everywhere. torch's selective checkpoint caches the saved
output by reference and raises ("Tensor cached during selective activation
checkpoint has been mutated") when backward finds it changed. So the same
dispatch mode that records the forward's dataflow, which sits under the
selective-checkpoint mode and sees every op before it runs, looks for a
cached tensor that shares its storage with what the op is about to write,
and swaps the cache's entry for a copy of it, taken before the write: the
recompute reads what the saved op produced, exactly as if the write had
been out of place. The copy costs the bytes the policy meant to save (the
written storage itself goes on as the in-place result), and the memory
tracker and fake tensors beneath this mode see it, so simulated steps and
plans price it. The op-level modes the planner builds never save such an
output in the first place (NOTE [op-level frontier] in memfit.planning.frontier).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.utils.checkpoint as tuc
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map

from memfit.core import strategies

VIEW, FRESH, INPLACE, OTHER = "view", "fresh", "inplace", "other"
IGNORED = getattr(tuc, "SAC_IGNORED_OPS", {torch.ops.aten.detach.default})  # metadata and detach: never numbered
UNINITIALISED = {
    getattr(torch.ops.aten, n).default if n != "empty" else torch.ops.aten.empty.memory_format
    for n in ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")
}
_PLAIN = (torch.Tensor, torch.nn.Parameter, FakeTensor)


@dataclass(frozen=True)
class Flow:
    """One op of a block's forward: its name, the ops that wrote the storages
    it reads (none for a view: who reads the view reads its storage), and what
    kind of op it is: `view`, `fresh` (makes new tensors only), `inplace`
    (writes its first argument, a tensor of the block's, and returns it),
    `other` (always runs)."""

    name: str
    reads: tuple
    kind: str
    wrote: tuple = ()  # the ops that created the storages it writes in place


def numbered(func) -> bool:
    """Whether the selective-checkpoint policy numbers this op: not one it never sees (`IGNORED`), nor one it
    sees and does not number (`strategies.UNNUMBERED`)."""
    return func not in IGNORED and func not in strategies.UNNUMBERED


def written(func, args, kwargs) -> list:
    """The tensors `func` writes in place (its arguments marked `(a!)`)."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return []
    values = [args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(schema.arguments)]
    return [
        t
        for a, v in zip(schema.arguments, values)
        if a.alias_info is not None and a.alias_info.is_write
        for t in tree_leaves(v)
        if isinstance(t, torch.Tensor)
    ]


def copy_on_write(cache, targets):
    """NOTE [in-place writes to saved tensors]: replace each entry of a selective
    checkpoint's `cache` that shares storage with a tensor in `targets` by a copy."""
    written_storages = {id(t.untyped_storage()) for t in targets}
    entries = [e for values in cache.values() for e in (values.values() if isinstance(values, dict) else values)]
    for wrapper in tree_leaves(entries):
        value = getattr(wrapper, "val", None)
        if isinstance(value, torch.Tensor) and id(value.untyped_storage()) in written_storages:
            wrapper.val = value.clone()
            wrapper.version = wrapper.val._version


def _tensors(tree) -> list:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class Dataflow:
    """The ops of one block's forward, in the order the selective-checkpoint
    policy numbers them (`add`), what autograd saved (`packed`), and `last`,
    the op after which it saved the last tensor (the recompute stops there)."""

    def __init__(self):
        self.ops: list[Flow] = []
        self.roots: set = set()  # ops whose output autograd saved, or that an unnumbered op read
        self.last = -1
        self.opaque = None  # why this forward cannot be pruned, if it cannot
        self._writers = {}  # id(storage) -> (weakref, [ops that created it, then wrote it in place])
        self._unwritten = set()  # storages made by `empty` and its kind that no op has written yet

    def _writers_of(self, t):
        s = t.untyped_storage()
        ref, ops = self._writers.get(id(s), (None, None))
        return ops if ref is not None and ref() is s else None

    def _reads(self, tensors) -> set:
        return {k for t in tensors for k in (self._writers_of(t) or ())}

    def add(self, func, args, kwargs, out) -> Flow:
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        j, targets = len(self.ops), written(func, args, kwargs)
        if any(type(t) not in _PLAIN for t in ins + outs):
            self.opaque = f"{strategies.op_name(func)} runs on a tensor subclass"
        filled = {id(t.untyped_storage()) for t in targets}
        if any(id(t.untyped_storage()) in self._unwritten and id(t.untyped_storage()) not in filled for t in ins):
            self.opaque = (
                f"{strategies.op_name(func)} reads uninitialised memory that no op the dispatcher saw "
                "wrote: a kernel outside it may have"
            )
        self._unwritten -= filled
        inputs = {id(t.untyped_storage()) for t in ins}
        new = {id(s): s for t in outs if id(s := t.untyped_storage()) not in inputs}
        owners = [self._writers_of(t) for t in targets]
        if getattr(func, "is_view", False) or (outs and not targets and not new):  # `_unsafe_view` aliases too
            kind, reads = VIEW, ()
        else:
            reads = tuple(sorted(self._reads(ins)))
            if strategies.draws_random(func, args, kwargs):
                kind = OTHER
            elif targets:
                own = len(targets) == 1 and args and targets[0] is args[0] and out is args[0] and owners[0]
                kind = INPLACE if own else OTHER
            else:
                kind = FRESH if outs and len(new) == len(outs) else OTHER
        for key, s in new.items():
            self._writers[key] = (weakref.ref(s), [j])
            if func in UNINITIALISED:
                self._unwritten.add(key)
        for ops in owners:
            if ops is not None:
                ops.append(j)
        flow = Flow(strategies.op_name(func), reads, kind, tuple(ops[0] for ops in owners if ops is not None))
        self.ops.append(flow)
        return flow

    def take(self, func, args, kwargs, out) -> Flow | None:
        """An op as the selective-checkpoint policy sees it: numbered (`add`), or None for one it never sees
        (`IGNORED`) or does not number (`strategies.UNNUMBERED`)."""
        if numbered(func):
            return self.add(func, args, kwargs, out)
        if func in strategies.UNNUMBERED:
            self.unnumbered(args, kwargs)
        return None

    def unnumbered(self, args, kwargs):
        """An op the policy does not number read these: what it reads is needed."""
        self.roots |= self._reads(_tensors((args, kwargs)))

    def packed(self, t):
        """Autograd saved `t`, after the ops recorded so far."""
        self.roots |= set(self._writers_of(t) or ())
        self.last = len(self.ops) - 1


def needed(ops: list, roots, last: int, saved) -> set:
    """The ops up to `last` whose outputs a recompute that takes the `saved`
    ones from the cache needs: what autograd saves, and what the ops it runs
    (those that are not skipped) read, back through the ops it runs."""
    need = set()
    stack = [*roots, *(j for j, op in enumerate(ops[: last + 1]) if op.kind == OTHER and j not in saved)]
    while stack:
        j = stack.pop()
        if j in need:
            continue
        need.add(j)
        if j not in saved:
            stack.extend(ops[j].reads)
    return need


def skipped(ops: list, roots, last: int, saved) -> set:
    """The ops up to `last` a recompute that takes the `saved` ones from the cache can skip."""
    need = needed(ops, roots, last, saved)
    return {
        j for j, op in enumerate(ops[: last + 1]) if op.kind in (FRESH, INPLACE) and j not in saved and j not in need
    }


class PruneError(RuntimeError):
    pass


def _storage_key(t):
    s = t.untyped_storage()
    return id(s), s


class Pruner:
    """The pruned recompute of one checkpointed call (NOTE [pruned recompute]):
    `forward` and `recompute`, two re-enterable contexts that go under the
    selective-checkpoint ones, for the policy function `policy_fn` (which lists
    its decisions in `policy_fn.decisions`), whose selective checkpoint caches
    saved tensors in `cache` (NOTE [in-place writes to saved tensors])."""

    def __init__(self, policy_fn, cache):
        self.policy_fn, self.cache = policy_fn, cache
        self.flow = Dataflow()
        self.skip: frozenset = frozenset()
        self.saved: frozenset = frozenset()
        self.forward = _Scope(_Recording(self), self._pack_forward, self._end_forward)
        self.recompute = _Scope(_Pruning(self), self._pack_recompute, None)

    def _pack_forward(self, t):
        self.flow.packed(t)

    def _end_forward(self):
        decisions, flow = self.policy_fn.decisions, self.flow
        if flow.opaque or len(decisions) != len(flow.ops):
            return  # nothing skipped
        self.saved = frozenset(j for j, save in enumerate(decisions) if save)
        self.skip = frozenset(skipped(flow.ops, flow.roots, flow.last, self.saved))

    def _pack_recompute(self, t):
        if self.recompute.mode.is_placeholder(t):
            raise PruneError(
                "memfit: the pruned recompute of a block was about to save a tensor it skipped: "
                "the block's recompute took another path than its forward. Use strategy 'blocks' "
                "for it, or make its forward deterministic."
            )


class _Scope:
    """A dispatch mode and a saved-tensor hook around the policy's own contexts."""

    def __init__(self, mode, pack, end):
        self.mode, self._pack, self._end = mode, pack, end

    def __enter__(self):
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is None:  # no checkpoint hook beneath: nothing to watch
            self._hooks = False
        else:
            pack, unpack = top
            torch._C._autograd._push_saved_tensors_default_hooks(lambda t: (self._pack(t), pack(t))[1], unpack)
            self._hooks = True
        self.mode.start()
        self.mode.__enter__()

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        if self._hooks:
            torch._C._autograd._pop_saved_tensors_default_hooks()
        if self._end is not None and exc[0] is None:
            self._end()


class _Recording(TorchDispatchMode):
    """In the forward: every op the policy numbers goes into the call's Dataflow."""

    def __init__(self, pruner):
        super().__init__()
        self.pruner = pruner

    def start(self):
        self.pruner.flow = Dataflow()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        targets = written(func, args, kwargs)
        if targets:
            copy_on_write(self.pruner.cache, targets)
        out = func(*args, **kwargs)
        self.pruner.flow.take(func, args, kwargs, out)
        return out


class _Pruning(TorchDispatchMode):
    """In the recompute: the ops that reach it (the cache serves the saved
    ones first) are numbered as in the forward; the skipped ones get
    placeholders, and an op that would read one raises."""

    def __init__(self, pruner):
        super().__init__()
        self.pruner = pruner

    def start(self):
        p = self.pruner
        self._order = iter([j for j in range(len(p.flow.ops)) if j not in p.saved])
        self._placeholders = {}  # id(storage) -> weakref
        self._diverged = not p.skip
        self._at = -1

    def is_placeholder(self, t) -> bool:
        key, s = _storage_key(t)
        ref = self._placeholders.get(key)
        return ref is not None and ref() is s

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in IGNORED or not self.pruner.skip:
            return func(*args, **kwargs)
        ops = self.pruner.flow.ops
        if func not in strategies.UNNUMBERED:
            self._at = next(self._order, len(ops))
            if self._at >= len(ops) or ops[self._at].name != strategies.op_name(func):
                self._diverged = True
        if not self._diverged and self._at in self.pruner.skip:
            out = self._skip(func, args, kwargs, ops[self._at].kind)
            if out is not None:
                return out
        if (
            self._at <= self.pruner.flow.last
            and ops[self._at].kind != VIEW
            and any(self.is_placeholder(t) for t in _tensors((args, kwargs)))
        ):
            raise PruneError(
                f"memfit: the pruned recompute of a block reached {strategies.op_name(func)} reading "
                "a tensor it skipped: the block's recompute took another path than its forward. Use "
                "strategy 'blocks' for it, or make its forward deterministic."
            )
        return func(*args, **kwargs)

    def _skip(self, func, args, kwargs, kind):
        """Placeholders for the outputs of `func`, or None to run it after all."""
        if kind == INPLACE:  # its target no longer holds what the forward had: a placeholder now
            self._mark(args[0])
            return args[0]
        try:
            with _disable_current_modes():
                meta = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
        except Exception:  # no meta kernel (or one that needs values): compute it
            return None
        device = kwargs.get("device") or next((t.device for t in _tensors(args)), torch.device("cpu"))
        out = tree_map(
            lambda m: (
                torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device)
                if isinstance(m, torch.Tensor)
                else m
            ),
            meta,
        )
        for t in _tensors(out):
            self._mark(t)
        return out

    def _mark(self, t):
        key, s = _storage_key(t)
        self._placeholders[key] = weakref.ref(s)


def _to_meta(x):
    if not isinstance(x, torch.Tensor):
        return x
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
