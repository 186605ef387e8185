"""The on-disk cache of per-chunk gradients.

Layout: `root/<key>/{video_id}_chunk_{idx:03d}.pt` and `root/<key>/manifest.json`,
where `key` hashes the model's name, a hash of its weights and the config
(mode, chunk size, target choice). A changed model, weights or config gets a
new key: the cache is never silently reused for something else, and what
was cached before is kept.

* Files are written to a temporary name in the same directory and renamed
  (`os.replace`), and the manifest likewise, so a run killed at any moment
  leaves no half-written file that a later run reads.
* The manifest records a SHA-256 per file; a file whose bytes do not match
  (truncated, corrupted) is reported in `corrupt` and recomputed.
* No pickle: tensors are saved with `torch.save` and read with
  `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from memfit.errors import MemfitError
from memfit.report import atomic_write


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
            raise MemfitError(f"cannot write the cache directory {root}: {e.strerror}; choose a writable "
                              f"--cache-dir.") from None
        self.manifest_path = self.dir / "manifest.json"
        self.files: dict[str, str] = {}
        self.corrupt: list[str] = []
        self.reused: list[str] = []
        if self.manifest_path.exists():
            try:
                self.files = json.loads(self.manifest_path.read_text())["files"]
            except (ValueError, KeyError):
                self.corrupt.append("manifest.json")  # every chunk is recomputed; files are rewritten

    def get(self, name: str):
        """The cached tensor, or None (missing, or its checksum does not match)."""
        path = self.dir / f"{name}.pt"
        if name not in self.files or not path.exists():
            return None
        if _sha256(path) != self.files[name]:
            self.corrupt.append(name)
            return None
        self.reused.append(name)
        return torch.load(path, weights_only=True)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        path = self.dir / f"{name}.pt"
        atomic_write(path, lambda f: torch.save(tensor.cpu(), f), "wb")
        self.files[name] = _sha256(path)
        data = json.dumps({**self.info, "files": self.files}, indent=1).encode()
        atomic_write(self.manifest_path, lambda f: f.write(data), "wb")
