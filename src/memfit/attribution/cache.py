"""The on-disk cache of per-chunk gradients.

Layout: `root/<key>/{video}_{clip}_t{target}_chunk_{idx:03d}.pt`, each with a
`.sha256` file beside it. `key` hashes the model's name, a hash of its
weights and the config (mode, chunk size); within it, a chunk's name holds
everything else that determines its gradient: the first 12 hex digits of the
SHA-256 of the clip's contents and the target class. A changed model,
weights, config, clip or target never reuses a chunk computed for another,
and what was cached before is kept; a subset of the videos, or other
targets for some, reuse what they share.

* Every file is written to a temporary name in the same directory and
  renamed (`os.replace`), so a run killed at any moment leaves no
  half-written file that a later run reads.
* Each chunk's SHA-256 sits in its own small file, written after the chunk:
  there is no shared manifest, so concurrent runs sharing a cache directory
  never lose each other's entries. A chunk whose bytes do not match its
  checksum (truncated, corrupted), or that has none, is reported in
  `corrupt` and recomputed.
* A chunk the disk will not take (full, removed) is listed in `unwritten`;
  its gradient is used all the same.
* No pickle: tensors are saved with `torch.save` and read with
  `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from memfit.errors import MemfitError
from memfit.tools.report import atomic_write


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clip_hash(clip: torch.Tensor) -> str:
    return hashlib.sha256(clip.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class Cache:
    def __init__(self, root, model_name: str, weights: str, config: dict):
        self.info = {"model": model_name, "weights_sha256": weights, "config": config}
        key = hashlib.sha256(json.dumps(self.info, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / key
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise MemfitError(
                f"cannot write the cache directory {root}: {e.strerror}; choose a writable cache directory."
            ) from None
        self.corrupt: list[str] = []
        self.reused: list[str] = []
        self.unwritten: list[str] = []  # chunks computed but not cached

    @staticmethod
    def name(video: str, clip_sha: str, target: int, idx: int) -> str:
        """The file name (without suffix) of one chunk's gradient."""
        return f"{video}_{clip_sha[:12]}_t{target}_chunk_{idx:03d}"

    def names(self) -> list[str]:
        """The chunks held, valid or not."""
        return sorted(p.stem for p in self.dir.glob("*.pt"))

    def get(self, name: str):
        """The cached tensor, or None (missing, or its checksum does not match)."""
        path, checksum = self.dir / f"{name}.pt", self.dir / f"{name}.sha256"
        if not path.exists():
            return None
        if not checksum.exists() or _sha256(path) != checksum.read_text().strip():
            self.corrupt.append(name)
            return None
        self.reused.append(name)
        return torch.load(path, weights_only=True)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Keep a chunk's gradient; if the disk will not take it (full, gone),
        the run goes on with what it computed and `unwritten` says why."""
        path = self.dir / f"{name}.pt"
        try:
            atomic_write(path, lambda f: torch.save(tensor.cpu(), f), "wb")
            digest = _sha256(path)
            atomic_write(self.dir / f"{name}.sha256", lambda f: f.write(digest + "\n"))
        except OSError as e:
            self.unwritten.append(f"{name} ({e.strerror})")
