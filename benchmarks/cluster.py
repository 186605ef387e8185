"""Per-rank memory on a cluster, planned on this machine (issue 29); prints a table and writes JSON.

    python benchmarks/cluster.py [--out benchmarks/results] [--only 8b|70b]

Llama-3.1-8B-shaped (benchmarks/configs/llama-3.1-8b.json) at sequence 8192, local batch 2, FSDP2 on 8 and
128 ranks, and Llama-3.1-70B-shaped on FSDP 32 × TP 8 (torchtitan's tensor-parallel plan for Llama,
`memfit.models.hf.tensor_parallel`), both with bf16 mixed precision as torchtitan trains and AdamW, budget 80 GiB
per rank: one rank's peak with no checkpointing, `blocks`, `selective` and a FLOP-cost plan, each simulated by
FSDP2 and DTensor themselves on torch's fake process group (NOTE [one rank simulated]). The models are built
on the meta device from their configs: no weights, nothing allocated. Each case's wall time and this
process's peak resident memory are recorded beside the rows.
"""

import argparse
import datetime
import json
import platform
import resource
import time
from pathlib import Path

import torch
from rich.console import Console

from memfit.models import hf
from memfit.planning.sharding import Layout
from memfit.tools.cluster import cluster_rows
from memfit.tools.report import cluster_table

HERE = Path(__file__).parent
SEQ, BATCH, BUDGET = 8192, 2, "80GiB"
CASES = {
    "8b": ("llama-3.1-8b.json", [Layout("fsdp", w, param_dtype=torch.bfloat16) for w in (8, 128)]),
    "70b": (
        "llama-3.1-70b.json",
        [Layout("fsdp", 256, tp=8, parallelize=hf.tensor_parallel, param_dtype=torch.bfloat16)],
    ),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--only", choices=list(CASES))
    args = ap.parse_args()
    console, results = Console(width=160), []
    for name, (config, layouts) in CASES.items():
        if args.only and name != args.only:
            continue
        model, batch, loss_fn = hf.from_config(str(HERE / "configs" / config), BATCH, SEQ)
        for layout in layouts:
            t0 = time.perf_counter()
            rows = cluster_rows(model, batch, loss_fn, BUDGET, [layout], cost="flops")
            seconds = time.perf_counter() - t0
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            console.print(cluster_table(rows, f"{name}: {layout}, sequence {SEQ}, local batch {BATCH}, bf16 mixed"))
            console.print(f"  {seconds:.0f} s for the four rows, peak resident memory {rss / 2**30:.2f} GiB")
            results.append({"model": name, "config": config, "seconds": seconds, "max_rss_bytes": rss, "rows": rows})
    stamp = datetime.date.today().isoformat()
    path = Path(args.out) / f"cluster-cpu-{stamp}{'-' + args.only if args.only else ''}.json"
    meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(), "date": stamp}
    path.write_text(
        json.dumps({**meta, "seq_len": SEQ, "local_batch": BATCH, "budget": BUDGET, "cases": results}, indent=1)
    )
    console.print(f"written to {path}")


if __name__ == "__main__":
    main()
