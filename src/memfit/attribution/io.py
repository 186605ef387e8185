"""Reading videos: `.npy` / `.pt` arrays of shape frames x channels x height x
width, or directories of numbered PNG/JPEG frames (read with Pillow)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from memfit.errors import MemfitError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")


def video_ids(paths) -> dict:
    """An id per video path: its file or directory name without suffix, with
    as many parent directories as it takes to tell apart videos of the same
    name (`a/clip_000.npy`, `b/clip_000.npy` -> `a-clip_000`, `b-clip_000`).
    The same path given twice is one video."""
    paths = list(dict.fromkeys(Path(p).resolve() for p in paths))
    ids = {}
    for path in paths:
        for depth in range(1, len(path.parts) + 1):
            key = "-".join((*path.parent.parts[len(path.parts) - depth :], path.stem))
            if sum(key == "-".join((*q.parent.parts[len(q.parts) - depth :], q.stem)) for q in paths) == 1:
                break
        ids[key] = path
    return ids


def load_video(path) -> torch.Tensor:
    """(T, C, H, W) float32 from an array file or a directory of frames."""
    path = Path(path)
    if path.is_dir():
        return _frames(path)
    if not path.exists():
        raise MemfitError(
            f"video {path} does not exist; give .npy or .pt files of shape frames x channels x "
            f"height x width, or directories of numbered PNG/JPEG frames."
        )
    try:
        if path.suffix == ".npy":
            clip = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".pt":
            clip = torch.load(path, weights_only=True)
        else:
            raise MemfitError(
                f"video {path} is neither .npy, .pt nor a directory of frames; convert it to one of those."
            )
    except MemfitError:
        raise
    except Exception as e:
        why = (
            "not a tensor torch.load reads without pickle"
            if isinstance(e, pickle.UnpicklingError)
            else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        )
        raise MemfitError(f"cannot read video {path} ({why}); give a .npy or .pt array.") from None
    if not isinstance(clip, torch.Tensor) or clip.dim() != 4:
        shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise MemfitError(
            f"video {path} has shape {shape}; it must be 4-dimensional: frames x channels x height x width."
        )
    if clip.shape[0] == 0:
        raise MemfitError(f"video {path} has no frames; give clips of at least one frame.")
    return clip.float()


def _frames(directory: Path) -> torch.Tensor:
    files = [f for f in directory.iterdir() if f.suffix.lower() in FRAME_SUFFIXES]
    if not files:
        raise MemfitError(
            f"directory {directory} has no PNG or JPEG frames; name them with their frame number, like frame_000.png."
        )
    numbered = {}
    for f in files:
        m = re.search(r"(\d+)(?!.*\d)", f.stem)
        if not m:
            raise MemfitError(f"frame {f.name} in {directory} has no frame number in its name.")
        numbered[int(m.group(1))] = f
    first, last = min(numbered), max(numbered)
    missing = sorted(set(range(first, last + 1)) - set(numbered))
    if missing:
        raise MemfitError(f"frames in {directory} have gaps (missing number {missing[0]}); number them consecutively.")
    try:
        from PIL import Image
    except ImportError:
        raise MemfitError("reading frame directories needs Pillow: pip install pillow.") from None
    try:
        arrays = [
            np.asarray(Image.open(numbered[i]).convert("RGB"), dtype=np.float32) / 255 for i in range(first, last + 1)
        ]
    except OSError as e:  # PIL.UnidentifiedImageError included
        raise MemfitError(f"cannot read a frame in {directory} ({e}); give PNG or JPEG images.") from None
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise MemfitError(f"frames in {directory} have mixed sizes {sorted(sizes)}; resize them to one size.")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)
