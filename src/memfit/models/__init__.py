"""memfit's built-in models, in plain PyTorch, and loading a user's own.

Each built-in module has `build(size, batch_size, seed) -> (model, batch,
loss_fn)` and a `SIZES` table. A user's model is named `package.module:factory`;
the factory returns the same triple, and `loss_fn(model, batch)` returns the
scalar loss of one training step.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

from torch import nn

from memfit.errors import MemfitError
from memfit.models import gpt, mlp, resnet_se, video, vit_jepa
from memfit.models.switch import checkpointing  # noqa: F401 - for `memfit.models.checkpointing`

REGISTRY = {"gpt": gpt, "mlp": mlp, "resnet-se": resnet_se, "vit-jepa": vit_jepa, "video": video}
DEFAULT = "gpt"


def load(name: str, size: str | None = None, batch_size: int | None = None, seed: int = 0, seq_len: int | None = None):
    """(model, batch, loss_fn) for a built-in name, `hf:PATH/config.json` (on the meta device, `seq_len` tokens)
    or `package.module:factory`."""
    if batch_size is not None and batch_size < 1:
        raise MemfitError(f"batch size must be a positive integer, got {batch_size}.")
    if name.startswith("hf:") and name.endswith(".json"):
        from memfit.models import hf

        return hf.from_config(name[3:], batch_size or 1, seq_len, seed)
    options = {"size": size, "batch_size": batch_size, "seed": seed}
    if name in REGISTRY:
        module = REGISTRY[name]
        if size is not None and size not in module.SIZES:
            raise MemfitError(f"unknown size {size!r} for model {name!r}; sizes: {', '.join(module.SIZES)}.")
        return module.build(**{k: v for k, v in options.items() if v is not None})
    if name.startswith("hf:"):
        from memfit.models import hf

        if size is not None and size not in hf.SIZES:
            raise MemfitError(f"unknown size {size!r} for {name}; sizes: {', '.join(hf.SIZES)}.")
        return hf.build(name[3:], **{k: v for k, v in options.items() if v is not None})  # type: ignore[arg-type]
    if ":" not in name:
        raise MemfitError(
            f"unknown model {name!r}; built-in models: {', '.join(REGISTRY)}, or your own as package.module:factory."
        )
    return _user_factory(name, options)


def _user_factory(spec, options):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise MemfitError(f"model {spec!r} names no factory; give package.module:factory, like mymodel:make.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory resolve
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MemfitError(
            f"cannot import {module_name!r} ({e}); a model is named package.module:factory, with "
            f"the module importable from the current directory or an installed package."
        ) from None
    except SyntaxError as e:
        raise MemfitError(
            f"{module_name!r} has a syntax error ({e.filename}, line {e.lineno}: {e.msg}); fix it."
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise MemfitError(
            f"{module_name!r} has no function {attr!r}; a model is named package.module:factory, "
            f"where factory() returns (model, batch, loss_fn)."
        )
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in options.items() if v is not None and (accepts_all or k in params)}
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty
        and n not in kwargs
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if missing:
        raise MemfitError(
            f"{spec} needs argument {missing[0]!r}, which memfit does not pass; memfit passes "
            f"size, batch_size and seed where the factory takes them: give it defaults."
        )
    result = factory(**kwargs)
    if (
        not isinstance(result, tuple)
        or len(result) != 3
        or not isinstance(result[0], nn.Module)
        or not callable(result[2])
    ):
        raise MemfitError(
            f"{spec} returned {type(result).__name__}, not (model, batch, loss_fn): the factory "
            f"must return an nn.Module, a batch, and a function loss_fn(model, batch) -> loss."
        )
    return result
