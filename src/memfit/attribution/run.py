"""`memfit attribute`'s work: the demo, the comparison of modes, and the files it writes."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from memfit.attribution import attribute, checkpoint_model, compare_scores
from memfit.core.memory import track_memory
from memfit.core.wrapping import remove
from memfit.models import video
from memfit.tools.report import atomic_write, write_json


def demo(per_class=2, iters=40, size="small", seed=0):
    """A `video` model briefly trained on synthetic clips (one motion pattern
    per class), and fresh clips of each class to attribute: (model, videos, classes)."""
    cfg = video.SIZES[size]
    torch.manual_seed(seed)
    model = video.create_video(cfg)
    clips, labels = video.moving_clips(256, cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(iters):
        i = torch.randint(len(labels), (16,), generator=g)
        opt.zero_grad(set_to_none=True)
        video.loss_fn(model, (clips[i], labels[i])).backward()
        opt.step()
    test, test_labels = video.moving_clips(per_class * cfg.classes, cfg, seed + 99)
    videos = {f"video_{i:03d}": test[i] for i in range(len(test_labels))}
    classes = {vid: video.MOTIONS[int(test_labels[i])] for i, vid in enumerate(videos)}
    return model.eval(), videos, classes


def compare(
    model,
    videos,
    targets=None,
    *,
    chunk_size=8,
    reduce="l2",
    times_input=False,
    strategy="blocks",
    progress=lambda *a: None,
) -> dict:
    """Run exact (checkpointed), exact without checkpointing, and chunked on
    the same videos; measure each one's peak memory and time, and compare their scores."""
    modes, scores = {}, {}
    for name in ("exact_nockpt", "exact", "chunked"):
        remove(model)
        if name != "exact_nockpt":
            checkpoint_model(model, strategy)
        t0 = time.perf_counter()
        with track_memory(model) as mem:
            result = attribute(
                model,
                videos,
                targets,
                mode="chunked" if name == "chunked" else "exact",
                chunk_size=chunk_size,
                reduce=reduce,
                times_input=times_input,
                progress=lambda v, c, n, name=name: progress(name, v, c, n),
            )
        modes[name] = {"peak_bytes": mem.peak_bytes, "time_s": time.perf_counter() - t0, "memory_source": mem.source}
        scores[name] = result
    comparisons = []
    for a, b in (("exact", "exact_nockpt"), ("chunked", "exact")):
        per_video = {v: compare_scores(scores[a][v]["scores"], scores[b][v]["scores"]) for v in videos}
        comparisons.append(
            {
                "a": a,
                "b": b,
                "max_rel_error": max(c["max_rel_error"] for c in per_video.values()),
                "pearson": sum(c["pearson"] for c in per_video.values()) / len(per_video),
                "top_k_agreement": sum(c["top_k_agreement"] for c in per_video.values()) / len(per_video),
                "per_video": per_video,
            }
        )
    return {"modes": modes, "comparisons": comparisons, "results": scores}


def write_outputs(results: dict, out_dir, classes: dict | None = None) -> list[Path]:
    """Per video a CSV and a JSON of frame importance; a plot per video and one
    per class (importance over frames averaged over its videos)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    written = []
    for vid, r in results.items():
        atomic_write(
            out / f"{vid}.csv",
            lambda f, r=r: csv.writer(f).writerows([("frame", "importance"), *enumerate(r["scores"])]),
        )
        write_json(out / f"{vid}.json", {"video": vid, **r, "class": (classes or {}).get(vid)})
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.plot(r["scores"], marker=".")
        ax.set(xlabel="frame", ylabel="importance", title=f"{vid} (target {r['target']})")
        fig.tight_layout()
        atomic_write(out / f"{vid}.png", lambda f, fig=fig: fig.savefig(f, format="png", dpi=100), "wb")
        plt.close(fig)
        written += [out / f"{vid}.csv", out / f"{vid}.json", out / f"{vid}.png"]
    by_class: dict = {}
    for vid, r in results.items():
        by_class.setdefault((classes or {}).get(vid, f"class {r['target']}"), []).append(r["scores"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in sorted(by_class.items()):
        ax.plot(torch.tensor(rows).mean(0).tolist(), label=f"{label} ({len(rows)} videos)")
    ax.set(xlabel="frame", ylabel="mean importance", title="temporal importance by class")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out / "classes.png", lambda f: fig.savefig(f, format="png", dpi=110), "wb")
    plt.close(fig)
    written.append(out / "classes.png")
    write_json(out / "summary.json", {"videos": list(results), "classes": classes})
    return written
