"""Tables and files made from what the library returns. Nothing here measures."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from rich.table import Table

from memfit.core.memory import fmt_bytes
from memfit.errors import MemfitError


def check_writable(path: str | os.PathLike) -> Path:
    """Fail before any work is done if `path` cannot be written: by creating
    (and removing) the temporary sibling that `atomic_write` will write."""
    path = Path(path)
    if path.is_dir():
        raise MemfitError(f"{path} is a directory; give a file path such as {path / 'report.json'}.")
    try:
        fd, tmp = tempfile.mkstemp(dir=_parent(path), prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise MemfitError(
            f"cannot write {path} ({e.strerror}); choose a path in an existing, writable directory."
        ) from None
    return path


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write, mode: str = "w") -> None:
    """Write `path` whole or not at all: `write(file)` fills a temporary
    sibling, which then replaces `path`. The file gets the permissions a
    plain `open` would give it (0666 less the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=_parent(path), prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap the paths `a` and `b` (two directories) in one atomic step, where the
    system can (Linux: renameat2 with RENAME_EXCHANGE); False where it cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_json(path: str | os.PathLike, data) -> None:
    """Write `data` as JSON, atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"))


def verify_table(r: dict) -> Table:
    b, c = r["baseline"], r["checkpointed"]
    t = Table(
        title=f"memfit verify: {r['model']}, strategy {r['strategy']} "
        f"({r['blocks']['checkpointed']} of {r['blocks']['found']} blocks), {r['device']}"
        + (f", both compiled ({r['compile']})" if r.get("compile") else "")
    )
    t.add_column("")
    t.add_column("baseline", justify="right")
    t.add_column("checkpointed", justify="right")
    t.add_column("change", justify="right")
    t.add_row(
        f"peak memory ({r['memory_source']})",
        fmt_bytes(b["peak_bytes"]),
        fmt_bytes(c["peak_bytes"]),
        f"{-r['memory_reduction']:+.1%}",
    )
    if "predicted_peak_bytes" in c:
        t.add_row(
            "  predicted by the plan",
            "",
            fmt_bytes(c["predicted_peak_bytes"]),
            f"budget {fmt_bytes(c['budget_bytes'])}",
        )
    t.add_row(
        "  static (params, optimizer state, batch)", fmt_bytes(b["static_bytes"]), fmt_bytes(c["static_bytes"]), ""
    )
    if b["activation_bytes"] is not None:  # allocator events do not show the end of the forward
        t.add_row(
            "  kept for backward at end of forward",
            fmt_bytes(b["activation_bytes"]),
            fmt_bytes(c["activation_bytes"]),
            f"{c['activation_bytes'] / b['activation_bytes'] - 1:+.1%}" if b["activation_bytes"] else "",
        )
        if r.get("coverage") is not None:
            t.add_row("    of it inside the blocks (coverage)", f"{r['coverage']:.0%}", "", "")
    t.add_row(
        f"time per step (median of {r['steps']})",
        f"{b['step_time_s'] * 1e3:.1f} ms",
        f"{c['step_time_s'] * 1e3:.1f} ms",
        f"{r['slowdown']:+.1%}",
    )
    if "predicted_slowdown" in c:
        t.add_row("  predicted (time model)", "", "", f"{c['predicted_slowdown']:+.1%}")
    t.add_row(
        "FLOPs per step", f"{b['flops'] / 1e9:.2f} G", f"{c['flops'] / 1e9:.2f} G", f"{r['recompute_flops']:+.1%}"
    )
    if "compile_budget_at_this_peak" in r:
        c_b = r["compile_budget_at_this_peak"]
        t.add_row(
            "  torch.compile's own budget at this peak",
            "",
            "none reaches it" if c_b is None else f"{c_b['budget']}: {fmt_bytes(c_b['peak_bytes'])}",
            "" if c_b is None else f"{c_b['recompute_flops']:+.1%}",
        )
    _agreement_rows(t, r)
    return t


def _agreement_rows(t: Table, r: dict) -> None:
    """`verify`'s rows for what must be equal with and without checkpointing."""
    t.add_row(
        "gradients",
        "",
        "bitwise equal" if r["grads_bitwise_equal"] else f"max rel diff {r['grads_max_rel_diff']:.2g}",
        "",
    )
    t.add_row(
        "buffers (BatchNorm statistics)",
        "",
        "bitwise equal" if r["buffers_equal"] else f"max rel diff {r['buffers_max_rel_diff']:.2g}",
        "",
    )
    t.add_row("losses", "", "equal" if r["losses_equal"] else f"max diff {r['loss_max_abs_diff']:.2g}", "")
    t.add_row(
        "parameters after training",
        "",
        "bitwise equal" if r["params_equal"] else f"max rel diff {r['params_max_rel_diff']:.2g}",
        "",
    )


def plan_table(plan, measured: dict | None) -> Table:
    t = Table(title="predicted and measured")
    t.add_column("")
    t.add_column("predicted", justify="right")
    t.add_column("measured", justify="right")
    t.add_column("error", justify="right")
    if measured:
        err = measured["peak_bytes"] / plan.predicted_peak_bytes - 1
        t.add_row(
            f"peak memory ({measured['memory_source']})",
            fmt_bytes(plan.predicted_peak_bytes),
            fmt_bytes(measured["peak_bytes"]),
            f"{err:+.2%}",
        )
        t.add_row(
            "recomputed FLOPs (of a plain step)",
            f"{plan.predicted_recompute_flops:+.1%}",
            f"{measured['recompute_flops']:+.1%}",
            "",
        )
        if measured.get("slowdown") is not None:
            predicted = f"{plan.predicted_overhead:+.1%}" if plan.cost == "time" else ""
            t.add_row("slowdown (interleaved with the plain step)", predicted, f"{measured['slowdown']:+.1%}", "")
        if plan.predicted_step_time_s and measured.get("step_time_s"):
            step = plan.predicted_step_time_s * (1 + plan.predicted_overhead)
            t.add_row(
                "step time (time model)",
                f"{step * 1e3:.1f} ms",
                f"{measured['step_time_s'] * 1e3:.1f} ms",
                f"{measured['step_time_s'] / step - 1:+.0%}",
            )
        t.add_row(
            "budget",
            fmt_bytes(plan.budget_bytes),
            "fits" if measured["peak_bytes"] <= plan.budget_bytes else "EXCEEDED",
            "",
        )
    else:
        t.add_row("peak memory", fmt_bytes(plan.predicted_peak_bytes), "", "")
    return t


def bench_table(rows) -> Table:
    t = Table(title="memory / time frontier")
    for col in ("strategy", "budget", "predicted peak", "measured peak", "step time", "slowdown", "recomputed FLOPs"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    for r in rows:
        if not r["feasible"]:
            t.add_row(r["strategy"], "", "", "infeasible", "", "", "")
            continue
        t.add_row(
            r["strategy"],
            fmt_bytes(r["budget_bytes"]) if r["budget_bytes"] else "",
            fmt_bytes(r["predicted_peak_bytes"]),
            fmt_bytes(r["peak_bytes"]),
            f"{r['step_time_s'] * 1e3:.0f} ms",
            f"{r['slowdown']:+.1%}",
            f"{r['recompute_flops']:+.1%}",
        )
    return t


def require_matplotlib() -> None:
    """Fail before any work if plots are asked for and matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MemfitError("plots need matplotlib: pip install matplotlib (or memfit[plot]).") from None


def plot_frontier(rows, path, title="") -> None:
    """Peak memory against slowdown: planned runs as a line, uniform
    strategies as labelled points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    planned = sorted(
        (r for r in rows if r["feasible"] and r["strategy"].startswith("plan:")), key=lambda r: r["peak_bytes"]
    )
    ax.plot(
        [r["peak_bytes"] / 2**20 for r in planned],
        [100 * r["slowdown"] for r in planned],
        "o-",
        label="memfit plan at each budget",
    )
    for r in rows:
        if r["feasible"] and not r["strategy"].startswith("plan:"):
            x, y = r["peak_bytes"] / 2**20, 100 * r["slowdown"]
            ax.plot(x, y, "s", color="tab:red")
            ax.annotate(r["strategy"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"peak memory (MiB, {rows[0].get('memory_source', '')})")
    ax.set_ylabel("slowdown over no checkpointing (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cluster_table(rows: list[dict], title: str) -> Table:
    """`memfit plan --distributed`: one rank's predicted peak per layout and strategy, against the budget."""
    t = Table(title=title)
    parts = ("parameters", "gradients", "optimizer_state", "activations")
    columns = ("layout", "strategy", "parameter shards", "gradients", "optimizer state", "activations kept")
    for col in (*columns, "peak per rank", "budget", "fits"):
        t.add_column(col, justify="left" if col in ("layout", "strategy") else "right")
    for r in rows:
        peak = r["predicted_peak_bytes"]
        t.add_row(
            r["layout"],
            r["strategy"] + (f" (+{r['predicted_recompute_flops']:.1%} FLOPs)" if "plan" in r else ""),
            *(fmt_bytes(r[f"{p}_bytes"]) if f"{p}_bytes" in r else "" for p in parts),
            "no plan fits" if peak is None else fmt_bytes(peak),
            fmt_bytes(r["budget_bytes"]),
            "yes" if r["fits"] else "no",
        )
    return t


def fit_table(rows: list[dict], title: str) -> Table:
    """`memfit fit`: the largest batch that fits, per strategy."""
    t = Table(title=title)
    for col in ("strategy", "batch size", "peak", "time per sample"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    for r in rows:
        t.add_row(
            r["strategy"],
            str(r["batch_size"]),
            fmt_bytes(r["peak_bytes"]) if r["peak_bytes"] else "-",
            f"{r['time_per_sample_s'] * 1e3:.2f} ms" if r["time_per_sample_s"] else "-",
        )
    return t


def compare_tables(report: dict, n_videos: int) -> list[Table]:
    """`memfit attribute --compare`: each mode's peak and time, and how far their scores agree."""
    t = Table(title=f"attribution modes over {n_videos} videos")
    for col in ("mode", "peak memory", "time"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for name, m in report["modes"].items():
        t.add_row(name, fmt_bytes(m["peak_bytes"]), f"{m['time_s']:.2f} s")
    c = Table(title="agreement of per-frame importance")
    for col in ("a vs b", "max relative error", "Pearson", "top-5 agreement"):
        c.add_column(col, justify="left" if col == "a vs b" else "right")
    for row in report["comparisons"]:
        c.add_row(
            f"{row['a']} vs {row['b']}",
            f"{row['max_rel_error']:.3g}",
            f"{row['pearson']:.4f}",
            f"{row['top_k_agreement']:.0%}",
        )
    return [t, c]
