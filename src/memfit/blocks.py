"""Find the chain of repeated blocks in a model.

The chain is what memfit checkpoints: the transformer layers of a GPT
(`transformer.h`, `model.layers`, `encoder.layer`, `blocks`), the residual
blocks of a ResNet (`layer1` .. `layer4` together). Found automatically as the
longest run of same-shaped children of `nn.ModuleList` / `nn.Sequential`
containers, or named by the user.
"""
from __future__ import annotations

import fnmatch
from collections import Counter

from torch import nn

from memfit.errors import MemfitError

__all__ = ["find_blocks"]


def _shape(m: nn.Module):
    """Children count as the same block if they have the same type and, for
    generic containers, children of the same types."""
    if isinstance(m, (nn.Sequential, nn.ModuleList)):
        return (type(m), tuple(type(c) for c in m.children()))
    return type(m)


def find_blocks(model: nn.Module, blocks=None) -> list[tuple[str, nn.Module]]:
    """The chain of blocks, as (qualified name, module) in model order.

    `blocks`:
      * None: found automatically (the longest run of same-shaped children of a
        ModuleList or Sequential; sibling containers holding the same kind of
        block, like a ResNet's `layer1`..`layer4`, form one chain; runs nested
        inside another candidate's blocks are ignored);
      * "path.to.container": the children of that ModuleList / Sequential;
      * a glob over qualified module names, e.g. "encoder.layer.*", or several
        separated by "|" ("encoder.blocks.*|predictor.blocks.*");
      * a list of qualified module names.
    """
    if blocks is None:
        return _auto(model)
    named = dict(model.named_modules())
    if isinstance(blocks, str) and blocks in named and isinstance(named[blocks], (nn.Sequential, nn.ModuleList)):
        prefix = f"{blocks}." if blocks else ""
        found = [(f"{prefix}{n}", c) for n, c in named[blocks].named_children()]
    elif isinstance(blocks, str):
        patterns = blocks.split("|")
        found = [(n, m) for n, m in named.items() if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    else:
        missing = [n for n in blocks if n not in named]
        if missing:
            raise MemfitError(f"no module named {missing[0]!r} in the model; name blocks by their qualified "
                              f"names as in model.named_modules(), e.g. {next(iter(_auto_names(model)), 'layers.0')!r}.")
        found = [(n, named[n]) for n in blocks]
    found = _outermost(found)
    if not found:
        raise MemfitError(f"no blocks match {blocks!r}; pass the path of a ModuleList or Sequential "
                          f"(e.g. 'transformer.h') or a pattern over module names (e.g. 'layers.*').")
    return found


def _outermost(found):
    out = []
    for name, m in found:
        if not any(name.startswith(f"{kept}.") for kept, _ in out):
            out.append((name, m))
    return out


def _auto(model: nn.Module):
    groups: dict = {}  # (parent name, shape) -> [(name, module)]
    for name, container in model.named_modules():
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        kids = list(container.named_children())
        if len(kids) < 1:
            continue
        shape, count = Counter(_shape(c) for _, c in kids).most_common(1)[0]
        parent = name.rpartition(".")[0] if name else None
        prefix = f"{name}." if name else ""
        groups.setdefault((parent, shape), []).extend(
            (f"{prefix}{n}", c) for n, c in kids if _shape(c) == shape)
    candidates = [g for g in groups.values() if len(g) >= 2]
    members = [n for g in candidates for n, _ in g]
    top = [g for g in candidates if not any(g[0][0].startswith(f"{n}.") for n in members)]
    if not top:
        raise MemfitError(f"no chain of repeated blocks found in {type(model).__name__}: memfit looks for an "
                          f"nn.ModuleList or nn.Sequential of two or more blocks of the same type; name them "
                          f"with blocks='path.to.container' or a pattern like 'layers.*'.")
    return max(top, key=len)  # the first of the longest, in model order


def _auto_names(model):
    try:
        return [n for n, _ in _auto(model)]
    except MemfitError:
        return []
