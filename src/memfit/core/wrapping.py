"""Wrap the blocks of a model according to a strategy, and unwrap them.

    memfit.apply(model, "blocks")      # every block recomputed
    memfit.remove(model)               # back to the plain model

NOTE [no wrapper modules]
A wrapped block gets an instance-level `forward` (a bound method, so
`copy.deepcopy` rebinds it to the copy, as an EMA target network needs) and a
`_memfit` attribute that is not a module. No module is inserted or renamed, so
`state_dict()` keys and `named_parameters()` names are the same before, during
and after, and state dicts move freely between wrapped and plain models.
Hooks registered on a block itself run outside its checkpoint; hooks on its
submodules run again when it is recomputed.

NOTE [segments]
A segment (several consecutive blocks recomputed as one unit, keeping only the
first block's input) must span calls that the model's own loop makes one at a
time: `for block in self.blocks: x = block(x, mask)`. The first block called
opens a checkpoint region (`memfit.core.checkpointing.Region`); each later block of
the segment that is called with the previous block's output as its first
positional argument joins it, with its extra arguments and the RNG and
autocast state it ran under (NOTE [per-call replay]); the last block closes
it. In backward the recompute runs the recorded calls again, in order, each
under its own state, feeding each the previous one's output (its first
element if it returns a tuple). So:
* what the loop does between blocks is not part of the region: the region's
  saved-tensor hooks are paused between calls, and random numbers drawn there
  do not shift the blocks' dropout masks;
* a skipped block (LayerDrop) is simply not recorded, and a skipped last block
  leaves the region to be closed when the innermost module that contains the
  segment's blocks returns from its forward, normally or by an exception
  (hooks on those modules, always called);
* a block called out of order, twice, or with another first argument (a
  U-Net's concatenated skips, keyword-only inputs) closes the region and
  opens a new one at that call: still exact, but it keeps more than the
  segment would, so it warns once;
* blocks called from outside every containing module's forward have nothing
  to close a region after them: they are checkpointed one by one, with a
  warning.
"""

from __future__ import annotations

import fnmatch
import functools
import threading
import types
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from memfit.core import schedule, strategies
from memfit.core.blocks import find_blocks, find_chains
from memfit.core.checkpointing import CallState, Region, run, will_recompute
from memfit.core.schedule import Plan
from memfit.core.strategies import KEEP, OFFLOAD, RECOMPUTE
from memfit.errors import MemfitError

__all__ = ["wrap", "remove", "wrapped_blocks", "applied_strategy"]


def wrap(model: nn.Module, strategy="blocks", blocks=None, state_replay=True, *, training_only=True) -> nn.Module:
    """Checkpoint the blocks of `model` according to `strategy`; returns `model`.

    `strategy`: a strategy string (`none`, `blocks`, `every:K`, `segments:N`,
    `sqrt`, `selective`, `scores`, `pointwise`, `offload`), one per chain as a dict
    (`{"encoder.blocks": "blocks", "predictor.blocks": "selective"}`: containers
    or patterns, other chains left plain), a `memfit.Plan`, or a list of
    `strategies.Unit`. (`memfit.apply`, in `memfit.planning.planner`, also takes `plan:60%`,
    `plan:FILE.json` and `budget=`, and calls this.) `blocks`:
    which modules are blocks (see `memfit.find_chains`; every chain found by default). Applying again
    replaces the previous strategy. Recomputation only happens in training mode with grad
    enabled; in eval mode a wrapped block is a plain call. `state_replay=False`
    reproduces PyTorch's own checkpoint, which writes BatchNorm statistics
    twice: only for showing the difference. `training_only=False` also
    recomputes in eval mode, for gradients of an eval-mode model (attribution).
    """
    if not isinstance(model, nn.Module):
        raise MemfitError(
            f"apply takes a torch.nn.Module, not {type(model).__name__}; call memfit.apply(model, 'blocks')."
        )
    chain, units, blocks = resolve_units(model, strategy, blocks)  # a bad strategy leaves what is applied as it was
    remove(model)
    # NOTE [no KV cache]: a Hugging Face KV cache is state that recompute would append to a second time, so
    # `apply` turns it off, as their own checkpointing does in training, on every config (an encoder-decoder's
    # decoder stack has a copy of its own); `remove` turns it back on. Training with the cache on takes another
    # path (a concatenation) whose gradients differ in the last bits, so `verify` compares with the plain
    # model with the cache off: `apply(model, "none")`.
    configs: dict[int, Any] = {
        id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", None) is True
    }
    for config in configs.values():
        config.use_cache = False
    model.__dict__["_memfit_use_cache"] = list(configs.values())
    _wrap_chain(model, chain, units, state_replay, training_only)
    model.__dict__["_memfit_applied"] = {
        "units": units,
        "blocks": blocks,
        "state_replay": state_replay,
        "n_blocks": len(chain),
    }
    return model


def resolve_units(model, strategy, blocks):
    """(the blocks as (name, module), the units over them, the `blocks` that names them) for a strategy, checked
    against the model: a plan against its blocks, units against the chains."""
    s = schedule.parse(strategy)
    if s.budget is not None:
        raise MemfitError(
            f"checkpointing {str(s)!r} plans for a budget: call memfit.apply with batch and "
            f"loss_fn (it plans, then calls this), not memfit.core.wrapping.wrap."
        )
    strategy = s.strategy
    plan = strategy if isinstance(strategy, Plan) else None
    if isinstance(strategy, dict):  # {chain: strategy}: each chain's own, the others left as they are
        blocks = "|".join(strategy)
    if plan is not None:  # its blocks, as the plan lists them (a plan that names calls, 'name#K', is their trace)
        names = [b.name for b in plan.blocks]
        plan.check(
            [n for n, _ in find_blocks(model, names if blocks is None and any("#" in n for n in names) else blocks)]
        )
        blocks = names
    chains = find_chains(model, blocks)
    if plan is not None:
        units = plan.units
    elif isinstance(strategy, dict):
        units = _units_per_chain(strategy, chains)
    else:
        units = strategies.units_of(strategy, [len(c) for c in chains]) if isinstance(strategy, str) else list(strategy)
    _check_units(units, [len(c) for c in chains])
    return [b for c in chains for b in c], units, blocks


def _wrap_chain(model, chain, units, state_replay, training_only):
    """Wrap each unit's blocks; a block called several times per step (its calls named 'name#K', NOTE [blocks
    called several times] in memfit.core.blocks) gets one spec per call, chosen by counting its calls from the
    start of each forward of `model`."""
    specs: dict = {}  # block -> [spec of each call]
    for unit in units:
        members = chain[unit.start : unit.stop]
        segment = None
        if len(members) > 1 and unit.mode != KEEP:
            segment = _Segment([n for n, _ in members])
            segment.hook(_containers(model, segment.names))
        policy = strategies.policy(unit.mode)
        for index, (name, block) in enumerate(members):
            specs.setdefault(block, []).append(
                _Spec(
                    name, unit.mode, policy, segment, index, block.__dict__.get("forward"), state_replay, training_only
                )
            )
    for block, each in specs.items():
        if len(each) == 1 and "#" not in each[0].name:
            if each[0].mode != KEEP:
                block._memfit, block.forward = each[0], types.MethodType(_forward, block)
            continue
        block._memfit, block.forward = _Calls(each), types.MethodType(_forward, block)
        each[0].handles = [model.register_forward_pre_hook(block._memfit.restart)]


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: every block gets its own forward back."""
    if not isinstance(model, nn.Module):
        raise MemfitError(f"remove takes the torch.nn.Module that apply wrapped, not {type(model).__name__}.")
    model.__dict__.pop("_memfit_applied", None)
    for config in model.__dict__.pop("_memfit_use_cache", []):
        config.use_cache = True
    for m in model.modules():
        spec = m.__dict__.pop("_memfit", None)
        if spec is None:
            continue
        for one in spec.each if isinstance(spec, _Calls) else [spec]:
            for handle in [*(one.segment.handles if one.segment else ()), *one.handles]:
                handle.remove()
        if spec.prev_forward is None:
            del m.__dict__["forward"]
        else:
            m.forward = spec.prev_forward
    return model


def wrapped_blocks(model: nn.Module) -> list[tuple[str, str]]:
    """(block name, mode) for each block `apply` wrapped, in model order (a block called several times: each
    call it recomputes, 'name#K')."""
    return [
        (s.name, s.mode)
        for m in model.modules()
        if "_memfit" in m.__dict__
        for s in (m._memfit.each if isinstance(m._memfit, _Calls) else [m._memfit])
        if s.mode != KEEP
    ]


def applied_strategy(model: nn.Module) -> dict | None:
    """What `apply` did to `model` (units, blocks, state_replay, n_blocks), or None."""
    return model.__dict__.get("_memfit_applied")


def _containers(model, names):
    """The modules that contain every one of the blocks `names` (the root included)."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    named = dict(model.named_modules())
    return [named[".".join(common[:k])] for k in range(len(common) + 1)]


def _units_per_chain(strategy: dict, chains) -> list:
    """Units for {chain container or pattern: strategy string}, each chain parsed with its own."""
    units = []
    for at, chain in zip(strategies.chain_starts([len(c) for c in chains]), chains):
        key = next(k for k in strategy if chain[0][0].startswith(f"{k}.") or fnmatch.fnmatchcase(chain[0][0], k))
        units += strategies.shifted(strategies.units_of(strategy[key], len(chain)), at)
    return units


def _check_units(units, sizes):
    n = sum(sizes)
    if (
        not units
        or units[0].start != 0
        or units[-1].stop != n
        or any(a.stop != b.start for a, b in zip(units, units[1:]))
        or any(u.stop <= u.start for u in units)
    ):
        raise MemfitError(f"the strategy's units must cover blocks 0..{n - 1} in order; this model has {n} blocks.")
    starts = set(strategies.chain_starts(sizes))
    for u in units:
        if u.mode not in (KEEP, RECOMPUTE) and u.stop - u.start > 1:
            raise MemfitError(f"{u.mode} applies to one block at a time, not to a segment of several.")
        if u.mode != KEEP and any(u.start < s < u.stop for s in starts):
            raise MemfitError(
                f"a segment of blocks {u.start}..{u.stop - 1} spans two chains of blocks; a "
                f"segment recomputes consecutive blocks of one chain."
            )


class _Spec:
    def __init__(self, name, mode, policy, segment, index, prev_forward, state_replay, training_only):
        self.name, self.mode, self.policy = name, mode, policy
        self.segment, self.index, self.prev_forward = segment, index, prev_forward
        self.state_replay, self.training_only = state_replay, training_only
        self.handles = []


class _Calls:
    """The spec of each call of a block called several times per step, by the order of its calls since the
    model's forward began (per thread: `nn.DataParallel` runs replicas in threads). A call past the last one
    planned (a longer loop than the traced step's) is recomputed on its own, with the last call's mode."""

    def __init__(self, each):
        self.each, self.prev_forward, self._count = each, each[0].prev_forward, threading.local()

    def restart(self, module, args):
        self._count.n = 0

    def next(self) -> _Spec:
        k = getattr(self._count, "n", 0)
        self._count.n = k + 1
        if k < len(self.each):
            return self.each[k]
        last = self.each[-1]
        return _Spec(
            last.name, last.mode, last.policy, None, 0, last.prev_forward, last.state_replay, last.training_only
        )


def _forward(self, *args, **kwargs):
    spec = self._memfit
    if isinstance(spec, _Calls):
        spec = spec.next()
    fn = spec.prev_forward or functools.partial(type(self).forward, self)  # dynamo traces partial, not MethodType
    if spec.mode == KEEP:
        return fn(*args, **kwargs)
    if spec.mode == OFFLOAD:
        if not will_recompute(fn, spec.training_only):
            return fn(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return fn(*args, **kwargs)
    if spec.segment is None or torch.compiler.is_compiling():  # compiled: segments go block by block
        return run(
            fn, args, kwargs, policy=spec.policy, state_replay=spec.state_replay, training_only=spec.training_only
        )
    return spec.segment.call(spec.index, self, fn, args, kwargs, spec)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _Call:
    def __init__(self, index, fn, args, kwargs):
        self.index, self.fn = index, fn
        self._leaves, self._spec = tree_flatten((args[1:], kwargs))  # NOTE [inputs changed after the call]
        self.state = CallState([t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)])

    def rest(self):
        """The call's arguments after the first, and its keyword arguments, in containers as they were at the call."""
        return tree_unflatten(self._leaves, self._spec)


class _Open:
    """One thread's view of a segment: the open region and where it stands."""

    def __init__(self):
        self.region = self.calls = self.prev = None
        self.depth = 0  # how many modules containing the segment are running their forward
        self.opened_at = 0  # the depth when the region opened: it closes when the depth drops below


class _Segment:
    """The blocks of one segment and the region open between their calls (NOTE [segments])."""

    def __init__(self, names):
        self.names = names
        self.handles = []  # the hooks on the modules that contain the segment's blocks
        self.warned = False
        self._threads = {}

    def _open(self) -> _Open:
        return self._threads.setdefault(threading.get_ident(), _Open())

    def hook(self, containers):
        for m in containers:
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._exit, always_call=True))

    def _enter(self, module, args):
        if not torch.compiler.is_compiling():
            self._open().depth += 1

    def _exit(self, module, args, out):
        if torch.compiler.is_compiling():
            return
        state = self._open()
        state.depth -= 1
        if state.region is not None and state.depth < state.opened_at:
            self._end(state)

    def call(self, index, block, fn, args, kwargs, spec):
        state = self._open()
        recomputes = will_recompute(fn, spec.training_only)
        if state.region is not None:
            if recomputes and index > state.calls[-1].index and args and args[0] is state.prev:
                state.region.resume()
                state.calls.append(_Call(index, fn, args, kwargs))
                return self._run(state, index, fn, args, kwargs)
            self._end(state)
            if recomputes:
                self._warn(
                    f"block {self.names[index]} was called out of order or not with the previous block's "
                    f"output as its first positional argument, so the segment is recomputed in parts"
                )
        if not recomputes:
            return fn(*args, **kwargs)
        if state.depth == 0:
            self._warn(
                "its blocks were called from outside the forward of every module that contains them, "
                "so nothing would close a segment after them: they are checkpointed one by one"
            )
            return run(fn, args, kwargs, state_replay=spec.state_replay, training_only=spec.training_only)
        state.calls = [_Call(index, fn, args, kwargs)]
        state.region = Region(self._replay(state.calls), args, owner=block, state_replay=spec.state_replay)
        state.opened_at = state.depth
        return self._run(state, index, fn, args, kwargs)

    def _run(self, state, index, fn, args, kwargs):
        try:
            out = fn(*args, **kwargs)
        except BaseException as e:
            self._end(state, e)
            raise
        state.prev = _first(out)
        if index == len(self.names) - 1:
            self._end(state)
        else:
            state.region.pause()
        return out

    @staticmethod
    def _end(state, exc=None):
        region, state.region, state.calls, state.prev = state.region, None, None, None
        if exc is None:
            region.close()
        else:
            region.fail(exc)

    def _warn(self, why):
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"memfit: segment {self.names[0]}..{self.names[-1]}: {why}; gradients stay exact, "
                f"but it keeps more memory than planned. Use 'blocks' or a per-block plan for this model.",
                SegmentWarning,
                stacklevel=4,
            )

    @staticmethod
    def _replay(calls):
        def replay(*args):
            out = None
            for k, c in enumerate(calls):
                extra, kwargs = c.rest()
                with c.state.restored():
                    out = c.fn(*args, **kwargs) if k == 0 else c.fn(_first(out), *extra, **kwargs)
            return out

        return replay


class SegmentWarning(UserWarning):
    """A segment could not be recomputed as one region (see NOTE [segments])."""
