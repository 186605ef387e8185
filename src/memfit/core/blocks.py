"""Find the chains of repeated blocks in a model.

Chains are what memfit checkpoints: the transformer layers of a GPT
(`transformer.h`, `model.layers`, `encoder.layer`, `blocks`), the residual
blocks of a ResNet (`layer1` .. `layer4` together), an encoder's and a
decoder's layers, a U-Net's resnets and attention blocks. Found
automatically (NOTE [discovery]) or named by the user.
"""

from __future__ import annotations

import fnmatch
from collections import Counter

from torch import nn

from memfit.errors import MemfitError

__all__ = ["find_chains", "find_blocks", "with_calls"]


def _shape(m: nn.Module):
    """Children count as the same block if they have the same type and, for
    generic containers, children of the same types."""
    if isinstance(m, (nn.Sequential, nn.ModuleList)):
        return (type(m), tuple(type(c) for c in m.children()))
    return type(m)


def find_chains(model: nn.Module, blocks=None) -> list[list[tuple[str, nn.Module]]]:
    """Every chain of blocks in `model`, each as (qualified name, module) in
    model order; the chains in model order too.

    `blocks`:
      * None: found automatically (NOTE [discovery]);
      * "path.to.container": the children of that ModuleList / Sequential / ModuleDict;
      * a glob over qualified module names, e.g. "encoder.layer.*";
      * several of these separated by "|": "encoder.block|decoder.block",
        "encoder.blocks.*|predictor.blocks.*";
      * a list of qualified module names.
    Named blocks form chains as discovered ones do: consecutive blocks of the
    same kind in sibling containers.

    NOTE [discovery]
    A chain is a run of same-shaped children of `nn.ModuleList` /
    `nn.Sequential` / `nn.ModuleDict` containers, or two or more blocks of one
    type held as attributes of one module (timm's RegNet stages: `b1`, `b2`,
    ..., added with `add_module`); an attribute counts as a block, not a layer,
    if it holds two weight matrices or more and more than one kind of layer
    with parameters (`_is_block`: a conv-norm-act unit and a LoRA-wrapped
    linear map are layers). Sibling containers holding the same kind of
    block (a ResNet's `layer1`..`layer4`, a RegNet's `s1`..`s4`) form one
    chain. Blocks are in registration order, which is the order the forward
    calls them in every model seen so far; a segment whose blocks are called
    in another order still recomputes exactly, in parts, and warns
    (NOTE [segments]). Every chain is
    kept: both towers, encoder and decoder, a U-Net's down, mid and up
    blocks. Chains nested in another chain's blocks are left out (a block's
    attention heads), except in a *stage*: a block made mostly (half its
    parameters or more) of a nested chain of composite blocks, like a Swin or
    ConvNeXt stage or a diffusion U-Net's down block (a Sequential of leaf
    modules, like torchvision's Conv2dNormActivation, is a layer, not a
    composite block). Stages are not blocks:
    the blocks inside them are, which is the granularity that saves memory.
    A lone block of a kind that forms a chain elsewhere (a U-Net's middle
    attention) is a chain of one, and so is a lone composite block in a
    container beside a chain's containers (EfficientNet's first stage, one
    depthwise-separable block beside the stages of inverted residuals: at the
    highest resolution, it holds the most activations).
    """
    if blocks is None:
        return _auto(model)
    chains: list[list] = []
    for name, m in _named(model, blocks):
        if chains and _kind(chains[-1][-1]) == _kind((name, m)):
            chains[-1].append((name, m))
        else:
            chains.append([(name, m)])
    return chains


def _named(model, blocks) -> list:
    """The blocks `blocks` names (see `find_chains`), as (qualified name, module), outermost only."""
    named = dict(model.named_modules())
    if isinstance(blocks, str):
        found = []
        for part in blocks.split("|"):
            if part in named and isinstance(named[part], (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
                prefix = f"{part}." if part else ""
                found += [(f"{prefix}{n}", c) for n, c in named[part].named_children()]
            else:
                found += [(n, m) for n, m in named.items() if n and fnmatch.fnmatchcase(n, part)]
        found = sorted(dict(found).items(), key=lambda item: _order(model)[item[0]])
    elif isinstance(blocks, (list, tuple)) and all(isinstance(n, str) for n in blocks):
        missing = [n for n in blocks if _module_of(n) not in named or not _call_of(n).isdigit()]
        if missing:
            raise MemfitError(
                f"no module named {missing[0]!r} in the model; name blocks by their qualified "
                f"names as in model.named_modules(), e.g. {next(iter(_auto_names(model)), 'layers.0')!r}, "
                f"and a call of a block called several times per step as 'name#K' (K from 0)."
            )
        found = [(n, named[_module_of(n)]) for n in blocks]
    else:
        raise MemfitError(
            f"blocks={blocks!r} names no modules; give a container path like 'transformer.h', a "
            f"pattern like 'layers.*', or a list of module names."
        )
    found = _outermost(found)
    if not found:
        raise MemfitError(
            f"no blocks match {blocks!r}; pass the path of a ModuleList or Sequential "
            f"(e.g. 'transformer.h') or a pattern over module names (e.g. 'layers.*')."
        )
    return found


def _module_of(name: str) -> str:
    """The module a block's name names: 'albert.encoder.albert_layer_groups.0#3' is a call of '...groups.0'."""
    return name.partition("#")[0]


def _call_of(name: str) -> str:
    return name.partition("#")[2] or "0"


def with_calls(model: nn.Module, blocks, calls: dict):
    """`blocks` for a model whose forward calls a block several times per step
    (NOTE [blocks called several times]), given `calls`, where each module (by
    qualified name) was called in one forward (its calls' positions in the
    sequence of every module call): a list of names, in the order of the calls, in which
    each call of such a block is a block of its own, 'name#K'; `blocks` itself
    if no block is called twice.

    NOTE [blocks called several times]
    ALBERT applies one layer group num_hidden_layers times; a weight-shared
    (universal) transformer, a recurrent refinement (RAFT's update block, once
    per iteration) do the same. Each call is a place to checkpoint, so each is
    a block: 'albert.encoder.albert_layer_groups.0#0' .. '#11', one chain, with
    its own mode in a plan, segments across calls. A block found or named once
    is split into its calls if the forward calls it several times; with no
    blocks named, the outermost module called twice or more that holds two
    weight matrices or more, and lies neither inside nor around a found block,
    is a chain of its calls too. The blocks are then in the order the forward
    calls them. Only a step shows how many calls there are,
    so this takes the counts of a traced forward (`memfit.planning.simulation.count_calls`):
    plans, `verify` and `memfit.apply` with a batch find them; a plan's JSON
    names every call, so it applies to a fresh model without a trace. The
    parameters the calls share get the sum of every call's gradient, as
    without checkpointing: each call is recomputed from its own inputs.
    """
    try:
        names = [n for n, _ in find_blocks(model, blocks)]
    except MemfitError:
        if blocks is not None:
            raise
        names = []
    named = dict(model.named_modules())
    count = {n: len(at) for n, at in calls.items()}
    if blocks is None:
        outer = [
            n
            for n, c in count.items()
            if c >= 2
            and n in named
            and _repeats(named[n])
            and not any(n == b or n.startswith(f"{b}.") or b.startswith(f"{n}.") for b in names)
        ]
        names += [n for n in outer if not any(n.startswith(f"{o}.") for o in outer)]
    if not any(count.get(n, 1) >= 2 for n in names):
        return blocks
    seq, at = [], -1.0
    for n in names:  # a block the traced step skipped (LayerDrop) stays after the one before it
        for k in range(count.get(n, 1)):
            at = calls[n][k] if n in calls else at + 1e-3
            seq.append((at, f"{n}#{k}" if count[n] >= 2 else n) if n in calls else (at, n))
    return [n for _, n in sorted(seq)]


def _repeats(m: nn.Module) -> bool:
    """A module called several times that can be a block: not a container, two weight matrices or more."""
    return not isinstance(m, (nn.ModuleList, nn.ModuleDict)) and sum(1 for p in m.parameters() if p.dim() >= 2) >= 2


def find_blocks(model: nn.Module, blocks=None) -> list[tuple[str, nn.Module]]:
    """The blocks of every chain (`find_chains`), as one list of (qualified
    name, module) in model order."""
    return [b for chain in find_chains(model, blocks) for b in chain]


def _kind(item):
    """Blocks of one kind in sibling containers: (their containers' parent, their shape)."""
    name, m = item
    container = name.rpartition(".")[0]
    return (container.rpartition(".")[0] if container else None, _shape(m))


def _order(model):
    return {n: k for k, (n, _) in enumerate(model.named_modules())}


def _outermost(found):
    out = []
    for name, m in found:
        if not any(name.startswith(f"{kept}.") for kept, _ in out):
            out.append((name, m))
    return out


def _inside(name, chain):
    return any(name.startswith(f"{member}.") for member, _ in chain)


def _auto(model: nn.Module):
    groups: dict = {}  # (parent name, shape) -> [(name, module)]
    lone: dict = {}  # the same, for blocks held as attributes with no sibling of their shape
    for name, container in model.named_modules():
        kids = list(container.named_children())
        if not kids:
            continue
        shapes = Counter(_shape(c) for _, c in kids)
        parent = name.rpartition(".")[0] if name else None
        prefix = f"{name}." if name else ""
        if isinstance(container, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            shape, count = shapes.most_common(1)[0]
            # a block holds modules of its own, unless its container holds nothing else: a ResNet stem's
            # Conv2d, BatchNorm2d, ReLU are not blocks, the Linear layers of Sequential(Linear, Linear) are
            members = [
                (f"{prefix}{n}", c)
                for n, c in kids
                if _shape(c) == shape and (count == len(kids) or any(True for _ in c.children()))
            ]
        else:  # blocks held as attributes or added with add_module: two or more alike, each a block
            members = [(f"{prefix}{n}", c) for n, c in kids if shapes[_shape(c)] >= 2 and _is_block(c)]
            for n, c in kids:  # one alone (a RegNet stage of depth 1) joins a chain of its kind, if there is one
                if shapes[_shape(c)] == 1 and _is_block(c):
                    lone.setdefault((parent, _shape(c)), []).append((f"{prefix}{n}", c))
        for member in members:
            groups.setdefault((parent, _shape(member[1])), []).append(member)
    order = _order(model)
    for key, g in groups.items():
        g += lone.get(key, [])
        g.sort(key=lambda item: order[item[0]])
    candidates = [g for g in groups.values() if len(g) >= 2]
    blocks = [g for g in candidates if not _stage(g, candidates)]
    chains = [g for g in blocks if not any(_inside(g[0][0], other) for other in blocks if other is not g)]
    if not chains:
        raise MemfitError(
            f"no chain of repeated blocks found in {type(model).__name__}: memfit looks for two or "
            f"more blocks of the same type in an nn.ModuleList, nn.Sequential or nn.ModuleDict, or "
            f"held as attributes of one module; name them with blocks='path.to.container' or a "
            f"pattern like 'layers.*' (a block the forward calls several times is found from a step: "
            f"memfit.plan, verify, or memfit.apply(model, strategy, batch=..., loss_fn=...))."
        )
    kinds = {_shape(m) for chain in chains for _, m in chain}
    parents = {_kind(b)[0] for chain in chains for b in chain}
    for g in groups.values():  # lone blocks of a kind chained elsewhere, or beside a chain's containers
        alone = len(g) == 1 and (_shape(g[0][1]) in kinds or (_kind(g[0])[0] in parents and _composite(g[0][1])))
        if alone and not any(_inside(g[0][0], c) or _inside(c[0][0], g) for c in chains):
            chains.append(g)
    return sorted(chains, key=lambda chain: order[chain[0][0]])


def _is_block(m: nn.Module) -> bool:
    """Whether a module held as an attribute is a block rather than a layer:
    two or more weight matrices (convolutions, linear maps) and more than one
    kind of layer with parameters. A conv-norm-activation unit (one matrix) and
    a LoRA-wrapped linear map (only linear maps) are layers; a ModuleList or
    ModuleDict is never called, so it is a container, not a block."""
    if isinstance(m, (nn.ModuleList, nn.ModuleDict)):  # containers, not called
        return False
    layers = [s for s in m.modules() if any(True for _ in s.parameters(recurse=False))]
    matrices = sum(1 for s in layers for p in s.parameters(recurse=False) if p.dim() >= 2)
    return matrices >= 2 and len({type(s) for s in layers}) >= 2


def _stage(group, candidates) -> bool:
    """Whether `group`'s blocks are stages: half their parameters or more lie
    in nested chains of composite blocks (NOTE [discovery])."""
    nested = _outermost(
        [b for g in candidates if g is not group for b in g if _inside(b[0], group) and _composite(b[1])]
    )
    total = sum(p.numel() for _, m in group for p in m.parameters())
    inner = sum(p.numel() for _, m in nested for p in m.parameters())
    return total > 0 and inner >= total / 2


def _composite(m: nn.Module) -> bool:
    """A block of blocks or layers, not one layer: it has children, and is not
    a Sequential of leaf modules (a conv-norm-activation unit)."""
    kids = list(m.children())
    return bool(kids) and not (isinstance(m, nn.Sequential) and not any(True for k in kids for _ in k.children()))


def _auto_names(model):
    try:
        return [n for n, _ in find_blocks(model)]
    except MemfitError:
        return []
