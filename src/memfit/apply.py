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
time: `for block in self.blocks: x = block(x, mask)`. The first block opens a
checkpoint region (`memfit.checkpoint.Region`), each block records its extra
arguments, and the last block closes the region. The recompute runs the blocks
again in order, feeding each the previous block's output (its first element if
it returns a tuple) as first argument, plus the extra arguments it was called
with. So each block must be called with the previous block's output as its
first positional argument; anything else raises an error naming the block.
"""
from __future__ import annotations

import functools
import types

import torch
from torch import nn

from memfit import strategies
from memfit.blocks import find_blocks
from memfit.checkpoint import Region, _recomputes, run
from memfit.errors import MemfitError
from memfit.strategies import KEEP, OFFLOAD, RECOMPUTE

__all__ = ["apply", "remove", "wrapped_blocks", "applied_strategy"]


def apply(model: nn.Module, strategy="blocks", blocks=None, state_replay=True, *, budget=None, batch=None,
          loss_fn=None, cost="time", training_only=True) -> nn.Module:
    """Checkpoint the blocks of `model` according to `strategy`; returns `model`.

    `strategy`: a strategy string (`none`, `blocks`, `every:K`, `segments:N`,
    `sqrt`, `selective`, `scores`, `pointwise`, `offload`), a `memfit.Plan`, or a list of `strategies.Unit`.
    With `budget=` ('60%', '8GiB', 'auto') and `batch`, `loss_fn`, it plans
    first (`memfit.plan`, cached by shapes) and applies the plan. `blocks`:
    which modules form the chain (see `memfit.find_blocks`). Applying again
    replaces the previous strategy. Recomputation only happens in training mode with grad
    enabled; in eval mode a wrapped block is a plain call. `state_replay=False`
    reproduces PyTorch's own checkpoint, which writes BatchNorm statistics
    twice: only for showing the difference. `training_only=False` also
    recomputes in eval mode, for gradients of an eval-mode model (attribution).
    """
    from memfit.planner import Plan, plan

    if budget is not None:
        if batch is None or loss_fn is None:
            raise MemfitError("apply(model, budget=...) needs batch= and loss_fn= to plan with.")
        strategy = plan(model, batch, loss_fn, budget, blocks=blocks, cost=cost)
        applied = applied_strategy(model)
        if applied and applied["units"] == strategy.units:
            return model  # the same plan is already in place
    remove(model)
    chain = find_blocks(model, blocks)
    if isinstance(strategy, Plan):
        strategy.check([n for n, _ in chain])
        units = strategy.units
    else:
        units = strategies.parse(strategy, len(chain)) if isinstance(strategy, str) else list(strategy)
    _check_units(units, len(chain))
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is True:  # Hugging Face: a KV cache is state that recompute would append
        config.use_cache = False                     # to a second time; their own checkpointing turns it off too
        model.__dict__["_memfit_use_cache"] = True
    for unit in units:
        if unit.mode == KEEP:
            continue
        members = chain[unit.start:unit.stop]
        segment = _Segment([n for n, _ in members]) if len(members) > 1 else None
        policy = strategies.POLICIES.get(unit.mode)
        for index, (name, block) in enumerate(members):
            block._memfit = _Spec(name, unit.mode, policy, segment, index, block.__dict__.get("forward"),
                                  state_replay, training_only)
            block.forward = types.MethodType(_forward, block)
    model.__dict__["_memfit_applied"] = {"units": units, "blocks": blocks, "state_replay": state_replay,
                                         "n_blocks": len(chain)}
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: every block gets its own forward back."""
    model.__dict__.pop("_memfit_applied", None)
    if model.__dict__.pop("_memfit_use_cache", False):
        model.config.use_cache = True
    for m in model.modules():
        spec = m.__dict__.pop("_memfit", None)
        if spec is None:
            continue
        if spec.prev_forward is None:
            del m.__dict__["forward"]
        else:
            m.forward = spec.prev_forward
    return model


def wrapped_blocks(model: nn.Module) -> list[tuple[str, str]]:
    """(block name, mode) for each block `apply` wrapped, in model order."""
    return [(m._memfit.name, m._memfit.mode) for m in model.modules() if "_memfit" in m.__dict__]


def applied_strategy(model: nn.Module) -> dict | None:
    """What `apply` did to `model` (units, blocks, state_replay, n_blocks), or None."""
    return model.__dict__.get("_memfit_applied")


def _check_units(units, n):
    if not units or units[0].start != 0 or units[-1].stop != n or any(
            a.stop != b.start for a, b in zip(units, units[1:])) or any(
            u.stop <= u.start or u.mode not in strategies.MODES for u in units):
        raise MemfitError(f"the strategy's units must cover blocks 0..{n - 1} in order, each with a mode "
                          f"in {strategies.MODES}; this model has {n} blocks.")
    for u in units:
        if u.mode not in (KEEP, RECOMPUTE) and u.stop - u.start > 1:
            raise MemfitError(f"{u.mode} applies to one block at a time, not to a segment of several.")


class _Spec:
    def __init__(self, name, mode, policy, segment, index, prev_forward, state_replay, training_only):
        self.name, self.mode, self.policy = name, mode, policy
        self.segment, self.index, self.prev_forward = segment, index, prev_forward
        self.state_replay, self.training_only = state_replay, training_only


def _forward(self, *args, **kwargs):
    spec = self._memfit
    fn = spec.prev_forward or functools.partial(type(self).forward, self)  # dynamo traces partial, not MethodType
    if spec.mode == OFFLOAD:
        if not _recomputes(fn, spec.training_only):
            return fn(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return fn(*args, **kwargs)
    if spec.segment is None or torch.compiler.is_compiling():  # compiled: segments go block by block
        return run(fn, args, kwargs, policy=spec.policy, state_replay=spec.state_replay,
                   training_only=spec.training_only)
    return spec.segment.call(spec.index, self, fn, args, kwargs, spec)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _Segment:
    """The open region of a segment between its first and last block's calls."""

    def __init__(self, names):
        self.names = names
        self.region = None

    def call(self, index, block, fn, args, kwargs, spec):
        last = index == len(self.names) - 1
        if index == 0:
            if self.region is not None:  # the previous forward stopped inside the segment
                self.region.fail(_abandoned)
                self.region = None
            if not _recomputes(fn, spec.training_only):
                return fn(*args, **kwargs)
            self.calls = [(fn, args[1:], kwargs)]
            self.region = Region(self._replay(self.calls), args, kwargs, owner=block, state_replay=spec.state_replay)
        elif self.region is None:
            return fn(*args, **kwargs)
        else:
            if not args or args[0] is not self.prev:
                error = MemfitError(
                    f"segment {self.names[0]}..{self.names[-1]}: block {self.names[index]} was not called with "
                    f"the previous block's output as its first positional argument, so it cannot be recomputed "
                    f"as part of a segment; use the 'blocks' or 'every:K' strategy for this model.")
                self._fail(error)
                raise error
            self.calls.append((fn, args[1:], kwargs))
        try:
            out = fn(*args, **kwargs)
        except BaseException as e:
            self._fail(e)
            raise
        self.prev = _first(out)
        if last:
            region, self.region, self.prev, self.calls = self.region, None, None, None
            region.close()
        return out

    def _fail(self, exc):
        region, self.region, self.prev, self.calls = self.region, None, None, None
        region.fail(exc)

    @staticmethod
    def _replay(calls):
        def replay(*args, **kwargs):
            fn, _, _ = calls[0]
            out = fn(*args, **kwargs)
            for fn, extra, kw in calls[1:]:
                out = fn(_first(out), *extra, **kw)
            return out
        return replay


_abandoned = RuntimeError("memfit: a segment's forward was abandoned before its last block ran")
