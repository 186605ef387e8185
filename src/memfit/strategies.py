"""What can be done to the blocks of a chain, and the strategy strings that say it.

A strategy resolves to units: runs of consecutive blocks, each with a mode.

* `keep`: run normally, keep every activation.
* `recompute`: keep only the unit's input; recompute everything in backward.
  A unit of several blocks is a segment: it stores the input of its first block
  only, and recomputes all its blocks at once in backward.
* `selective`: inside the block keep the outputs of linear layers (`mm`,
  `addmm`), convolutions and fused attention kernels, and recompute the rest:
  norms, activations, dropout, and an attention core computed with batched
  matmuls (scores, softmax, dropout, scores x values), whose T x T tensors
  are the largest and cheapest to recompute (Korthikanti et al. 2022).
* `pointwise`: keep the outputs of every matrix product (batched ones too),
  convolution and attention kernel, and recompute only the ops that do no
  matrix work: norms, activations, softmax, dropout. It recomputes almost no
  FLOPs and saves the least of the three.
* `scores`: between the two: also recompute the batched matmuls whose output
  is larger than their inputs (the T x T attention scores, q @ k^T), but keep
  the ones whose output is smaller (scores @ v): about half the FLOPs of
  `selective` for a little more memory.
The planner mixes all of them, block by block.
* `offload` (CUDA): recompute nothing; move the block's saved tensors to
  pinned CPU memory in the forward and back in the backward
  (`torch.autograd.graph.save_on_cpu`). It costs transfer time, not FLOPs, so
  the planner considers it only for a model on CUDA with the time cost.

Strategy strings: `none`, `blocks`, `every:K`, `segments:N`, `sqrt`, `selective`, `scores`, `pointwise`,
`offload`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import CheckpointPolicy

from memfit.errors import MemfitError

KEEP, RECOMPUTE, SELECTIVE, SCORES, POINTWISE = "keep", "recompute", "selective", "scores", "pointwise"
OFFLOAD = "offload"
MODES = (KEEP, RECOMPUTE, SELECTIVE, SCORES, POINTWISE, OFFLOAD)
SAC_MODES = (SELECTIVE, SCORES, POINTWISE)  # one block at a time, with a policy over its ops
NAMES = ("none", "blocks", "every:K", "segments:N", "sqrt", "selective", "scores", "pointwise", "offload")


@dataclass(frozen=True)
class Unit:
    """Blocks `start` to `stop - 1` of the chain, handled as one unit."""

    start: int
    stop: int
    mode: str


def check(strategy: str) -> str:
    """The strategy string, lowercased, once its name and argument are known good."""
    text = str(strategy).strip().lower()
    name, _, arg = text.partition(":")
    accepted = f"accepted: {', '.join(NAMES)} (K, N positive integers)"
    if name in ("none", "blocks", "sqrt", OFFLOAD, *SAC_MODES) and arg:
        raise MemfitError(f"strategy {strategy!r} takes no argument; {accepted}.")
    if name in ("every", "segments"):
        if not (arg.isdigit() and str(int(arg)) == arg and int(arg) >= 1):
            raise MemfitError(f"{name}:{arg} needs a positive integer, like {name}:2; {accepted}.")
    elif name not in ("none", "blocks", "sqrt", OFFLOAD, *SAC_MODES):
        raise MemfitError(f"unknown strategy {strategy!r}; {accepted}.")
    return text


def parse(strategy: str, chains) -> list[Unit]:
    """Units for a strategy string over chains of these lengths (`chains`: a
    list of lengths, or one int for a single chain), numbered across the
    chains in order. A strategy applies to each chain alone: `every:K`
    recomputes every K-th block of each chain, `sqrt` and `segments:N` cut
    each chain into segments (never across two chains; a chain shorter than
    N gets one segment per block)."""
    sizes = [chains] if isinstance(chains, int) else list(chains)
    name, _, arg = check(strategy).partition(":")
    k = int(arg) if arg else None
    if name == "segments" and k > max(sizes):
        raise MemfitError(f"segments:{k} asks for more segments than the {max(sizes)} blocks of the longest "
                          f"chain; use segments:1 to segments:{max(sizes)}.")
    units, at = [], 0
    for n in sizes:
        units += [Unit(at + u.start, at + u.stop, u.mode) for u in _chain(name, k, n)]
        at += n
    return units


def _chain(name: str, k: int | None, n: int) -> list[Unit]:
    if name == "none":
        return [Unit(0, n, KEEP)]
    if name == "blocks":
        return [Unit(i, i + 1, RECOMPUTE) for i in range(n)]
    if name in (*SAC_MODES, OFFLOAD):
        return [Unit(i, i + 1, name) for i in range(n)]
    if name == "sqrt":
        return segments(n, max(1, round(math.sqrt(n))))
    if name == "every":
        return [Unit(i, i + 1, RECOMPUTE if i % k == 0 else KEEP) for i in range(n)]
    return segments(n, min(k, n))


def segments(n_blocks: int, n: int) -> list[Unit]:
    """`n` recomputed runs of consecutive blocks, as even as possible
    (the first `n_blocks % n` one block longer)."""
    size, extra = divmod(n_blocks, n)
    units, start = [], 0
    for i in range(n):
        stop = start + size + (i < extra)
        units.append(Unit(start, stop, RECOMPUTE))
        start = stop
    return units


aten = torch.ops.aten
# The ops whose outputs `selective` keeps: linear layers (which reach the
# dispatcher as mm / addmm, whatever the input's rank, or as grouped matmuls
# in a mixture of experts), convolutions and fused attention kernels, whose outputs are small for their cost. Batched matmuls
# (bmm, baddbmm) are not kept: in a transformer they compute the attention
# scores and their product with the values, whose B x heads x T x T tensors are
# the "5as/h" term of Korthikanti et al. 2022 that selective recomputation removes.
def _ops(*names):
    """The default overloads of the aten ops with these names that this torch has."""
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


SAVED_OPS = _ops(
    "mm", "addmm", "_addmm_activation", "convolution", "_convolution",
    # fused expert and quantized matmuls: a mixture of experts' linear layers
    "_grouped_mm", "_scaled_grouped_mm", "_scaled_mm", "_int_mm", "_weight_int8pack_mm", "_weight_int4pack_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward", "_efficient_attention_forward")


# What `pointwise` keeps besides: every batched matrix product.
MATRIX_OPS = SAVED_OPS | {aten.bmm.default, aten.baddbmm.default}


def selective_policy(ctx, op, *args, **kwargs):
    """Keep the outputs of `SAVED_OPS`, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def pointwise_policy(ctx, op, *args, **kwargs):
    """Keep the outputs of `MATRIX_OPS`, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in MATRIX_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def expands(op, args) -> bool:
    """A batched matmul whose output has more elements than each of its inputs."""
    if op not in (aten.bmm.default, aten.baddbmm.default):
        return False
    a, b = args[-2], args[-1]
    out = a.shape[0] * a.shape[1] * b.shape[2]
    return out > a.numel() and out > b.numel()


def scores_policy(ctx, op, *args, **kwargs):
    """Keep the outputs of `MATRIX_OPS` except expanding batched matmuls."""
    keep = op in MATRIX_OPS and not expands(op, args)
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


POLICIES = {SELECTIVE: selective_policy, SCORES: scores_policy, POINTWISE: pointwise_policy}
