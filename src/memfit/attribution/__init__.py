"""Per-frame gradient importance over videos, exact or chunked,
with every chunk's gradients cached on disk as soon as they are computed.

    scores = memfit.attribution.attribute(model, {"video_001": clip}, mode="exact", cache=Cache(dir, ...))

* exact: the whole clip in one backward. With memfit checkpointing on the
  model's blocks (`checkpoint_model`), it gives the same gradients as without,
  bitwise on CPU in fp32, for less peak memory.
* chunked: the clip in chunks of `chunk_size` frames, each through the model
  alone. It is an approximation whenever the model mixes
  frames (a temporal transformer does): the comparison measures how far off
  it is.

Importance of a frame: the norm (l2, l1 or max) of the gradient of the target
class score with respect to that frame (times the input with
`times_input`), normalised to sum to 1 over the clip.
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.attribution.cache import Cache, clip_hash, weights_hash
from memfit.core import schedule
from memfit.core.wrapping import wrap
from memfit.errors import MemfitError
from memfit.models.video import VideoConfig

__all__ = [
    "attribute",
    "frame_scores",
    "checkpoint_model",
    "choose_checkpointing",
    "check_inputs",
    "cache_for",
    "compare_scores",
    "Cache",
]

REDUCE = ("l2", "l1", "max")
# Uniform strategies from the least recomputation to the least memory: what `choose_checkpointing` tries in turn.
LADDER = ("none", "pointwise", "scores", "selective", "blocks")


def checkpoint_model(model: nn.Module, strategy="blocks") -> nn.Module:
    """Checkpoint every chain of blocks of a video model (its spatial and its
    temporal blocks), also in eval mode: attribution differentiates an
    eval-mode model."""
    return wrap(model, strategy, training_only=False)


def frame_scores(grad: torch.Tensor, clip: torch.Tensor, reduce="l2", times_input=False) -> torch.Tensor:
    """(T,) importance from a (T, C, H, W) gradient, summing to 1."""
    if reduce not in REDUCE:
        raise MemfitError(f"unknown reduction {reduce!r}; use l2, l1 or max.")
    g = (grad * clip if times_input else grad).flatten(1).double()
    norms = {"l2": lambda t: t.norm(dim=1), "l1": lambda t: t.abs().sum(dim=1), "max": lambda t: t.abs().amax(1)}
    s = norms[reduce](g)
    return s / s.sum() if s.sum() > 0 else s


def _gradient(model, frames, target):
    x = frames[None].clone().requires_grad_(True)  # (1, t, C, H, W)
    scores = model(x)
    if not 0 <= target < scores.shape[1]:
        raise MemfitError(f"target class {target} is out of range; this model has classes 0 to {scores.shape[1] - 1}.")
    return torch.autograd.grad(scores[0, target], x)[0][0].detach()  # parameters' gradients are not needed


def simulated_peak(model, clip, strategy) -> int:
    """Peak bytes of one exact attribution of `clip` with `strategy`,
    simulated on fake tensors (see `memfit.planning.simulation`): exact on CPU, and
    nothing runs on the device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memfit.core.memory import track_memory
    from memfit.planning.simulation import copy_with

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fmodel, (fclip,) = copy_with(model, (clip,), mode.from_tensor)
    checkpoint_model(fmodel, strategy).eval()
    with mode, track_memory(fmodel, fclip, storage_tracker=True) as mem:
        _gradient(fmodel, fclip, 0)
    return mem.peak_bytes


def choose_checkpointing(model, clip, *, budget=None, strategy=None) -> tuple:
    """Checkpoint `model` for attributing `clip` (the longest clip, or chunk)
    and return (the strategy, its simulated peak, the peak without
    checkpointing; both None unless planned). `strategy`: any spelling
    `memfit.core.schedule.parse` reads, applied as given (default `blocks`);
    `budget` (or `plan:BUDGET`): bytes, '2GiB', '60%' of the peak without
    checkpointing, or 'auto'; then the first strategy of `LADDER` whose
    simulated peak fits. Raises, naming the smallest peak, if none fits."""
    from memfit.core.memory import fmt_bytes

    if budget is not None and strategy is not None:
        raise MemfitError("give a budget (memfit chooses the checkpointing) or a strategy, not both.")
    s = schedule.parse(schedule.Budget.parse(budget) if budget is not None else strategy or "blocks")
    if s.budget is None:
        checkpoint_model(model, s.strategy)
        return s.strategy, None, None
    device = next(model.parameters()).device
    peaks = {}
    for name in LADDER:
        peaks[name] = simulated_peak(model, clip, name)
        limit = s.budget.bytes(peaks["none"], device)
        if peaks[name] <= limit:
            checkpoint_model(model, name)
            return name, peaks[name], peaks["none"]
    raise MemfitError(
        f"budget {fmt_bytes(limit)} is below the smallest attribution peak checkpointing reaches, "
        f"{fmt_bytes(min(peaks.values()))} (without checkpointing: {fmt_bytes(peaks['none'])}); "
        f"give at least that, or attribute in chunks (mode='chunked')."
    )


def check_inputs(model, videos: dict, targets: dict | None = None, *, mode="exact", chunk_size=8) -> None:
    """Every input, checked before any work: each clip fits `model`, each
    target is one of its classes, the chunk size fits the clips (chunked)."""
    n_classes = min(_classes(model, vid, clip) for vid, clip in videos.items())
    for vid, target in (targets or {}).items():
        if not 0 <= target < n_classes:
            raise MemfitError(
                f"target class {target} is out of range for {vid}; this model has classes 0 to {n_classes - 1}."
            )
    frames = min(c.shape[0] for c in videos.values())
    if mode == "chunked" and not 1 <= chunk_size <= frames:
        raise MemfitError(f"chunk size {chunk_size} must be between 1 and the clips' {frames} frames.")


def _classes(model, vid, clip):
    cfg = getattr(model, "config", None)
    if isinstance(cfg, VideoConfig):
        if tuple(clip.shape[1:]) != (cfg.channels, cfg.size, cfg.size) or clip.shape[0] > cfg.frames:
            raise MemfitError(
                f"video {vid} has shape {tuple(clip.shape)}; this model takes up to {cfg.frames} "
                f"frames of {cfg.channels} x {cfg.size} x {cfg.size}."
            )
        return cfg.classes
    try:
        with torch.no_grad():
            scores = model.eval()(clip[None])
    except RuntimeError as e:
        raise MemfitError(
            f"the model cannot take video {vid} of shape {tuple(clip.shape)} "
            f"({str(e).splitlines()[0]}); give clips of the shape the model expects."
        ) from None
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise MemfitError(
            f"the model returned {type(scores).__name__} {tuple(getattr(scores, 'shape', ()))} for "
            f"video {vid}; attribution needs class scores of shape (clips, classes)."
        )
    return scores.shape[1]


def cache_for(root, model_name: str, model, mode: str, chunk_size: int) -> Cache:
    """The cache of one model's gradients under one attribution setting (its key: the model, its weights' hash,
    the mode and, chunked, the chunk size)."""
    return Cache(
        root, model_name, weights_hash(model), {"mode": mode, "chunk_size": chunk_size if mode == "chunked" else None}
    )


def chunks(n_frames: int, mode: str, chunk_size: int | None):
    if mode == "exact":
        return [(0, n_frames)]
    if not chunk_size or not 1 <= chunk_size <= n_frames:
        raise MemfitError(f"chunk size {chunk_size} must be between 1 and the clip's {n_frames} frames.")
    return [(s, min(s + chunk_size, n_frames)) for s in range(0, n_frames, chunk_size)]


def attribute(
    model,
    videos: dict,
    targets: dict | None = None,
    *,
    mode="exact",
    chunk_size=8,
    reduce="l2",
    times_input=False,
    cache: Cache | None = None,
    progress=lambda video, chunk, total: None,
) -> dict:
    """Per video id: {"target", "scores" (list of T floats), "chunks"}.

    `videos`: id -> clip (T, C, H, W). `targets`: id -> class; the model's
    prediction on the whole clip where missing. Each chunk's gradient is
    taken from `cache` if it holds a valid copy, else computed and stored
    there at once; `progress(video, chunk index, chunks)` after each.
    """
    if mode not in ("exact", "chunked"):
        raise MemfitError(f"unknown mode {mode!r}; use exact or chunked.")
    model.eval()
    out = {}
    for vid, clip in videos.items():
        target = (targets or {}).get(vid)
        if target is None:
            with torch.no_grad():
                target = int(model(clip[None]).argmax(1))
        spans = chunks(clip.shape[0], mode, chunk_size)
        grads, digest = [], clip_hash(clip) if cache else None
        for idx, (s, e) in enumerate(spans):
            name = Cache.name(vid, digest, target, idx) if cache and digest else ""
            g = cache.get(name) if cache else None
            if g is None:
                g = _gradient(model, clip[s:e], target)
                if cache:
                    cache.put(name, g)
            grads.append(g)
            progress(vid, idx, len(spans))
        grad = torch.cat(grads)
        out[vid] = {
            "target": target,
            "chunks": len(spans),
            "scores": frame_scores(grad, clip, reduce, times_input).tolist(),
        }
    return out


def compare_scores(a: list, b: list, k: int = 5) -> dict:
    """Max relative error, Pearson correlation, and the overlap of the top-k
    frames (a fraction) between two per-frame score vectors."""
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    rel = ((x - y).abs() / x.abs().clamp_min(1e-12)).max().item()
    pearson = (
        torch.corrcoef(torch.stack([x, y]))[0, 1].item() if x.std() > 0 and y.std() > 0 else float(torch.equal(x, y))
    )
    k = min(k, len(a))
    top = len(set(x.topk(k).indices.tolist()) & set(y.topk(k).indices.tolist())) / k
    return {"max_rel_error": rel, "pearson": pearson, "top_k_agreement": top, "k": k}
