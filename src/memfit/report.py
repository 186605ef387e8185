"""Tables and files made from what the library returns. Nothing here measures."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rich.table import Table

from memfit.errors import MemfitError


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_writable(path: str | os.PathLike) -> Path:
    """Fail before any work is done if `path` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise MemfitError(f"{path} is a directory; give a file path such as {path / 'report.json'}.")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise MemfitError(f"cannot write {path}: directory {parent} does not exist or is not writable; "
                          f"choose a path in an existing, writable directory.")
    return path


def write_json(path: str | os.PathLike, data) -> None:
    """Write atomically: a reader never sees a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def verify_table(r: dict) -> Table:
    b, c = r["baseline"], r["checkpointed"]
    t = Table(title=f"memfit verify: {r['model']}, strategy {r['strategy']} "
                    f"({r['blocks']['checkpointed']} of {r['blocks']['found']} blocks), {r['device']}")
    t.add_column("")
    t.add_column("baseline", justify="right")
    t.add_column("checkpointed", justify="right")
    t.add_column("change", justify="right")
    t.add_row(f"peak memory ({r['memory_source']})", fmt_bytes(b["peak_bytes"]), fmt_bytes(c["peak_bytes"]),
              f"{-r['memory_reduction']:+.1%}")
    t.add_row("  static (params, optimizer state, batch)", fmt_bytes(b["static_bytes"]), fmt_bytes(c["static_bytes"]), "")
    t.add_row("  kept for backward at end of forward", fmt_bytes(b["activation_bytes"]),
              fmt_bytes(c["activation_bytes"]),
              f"{c['activation_bytes'] / b['activation_bytes'] - 1:+.1%}" if b["activation_bytes"] else "")
    t.add_row(f"time per step (median of {r['steps']})", f"{b['step_time_s'] * 1e3:.1f} ms",
              f"{c['step_time_s'] * 1e3:.1f} ms", f"{r['slowdown']:+.1%}")
    t.add_row("FLOPs per step", f"{b['flops'] / 1e9:.2f} G", f"{c['flops'] / 1e9:.2f} G", f"{r['recompute_flops']:+.1%}")
    t.add_row("gradients", "", "bitwise equal" if r["grads_bitwise_equal"] else
              f"max rel diff {r['grads_max_rel_diff']:.2g}", "")
    t.add_row("buffers (BatchNorm statistics)", "", "bitwise equal" if r["buffers_equal"] else
              f"max rel diff {r['buffers_max_rel_diff']:.2g}", "")
    t.add_row("losses", "", "equal" if r["losses_equal"] else f"max diff {r['loss_max_abs_diff']:.2g}", "")
    return t
