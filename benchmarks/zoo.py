"""memfit on the model zoos: torchvision and timm models built with their
own constructors (tests/zoo.py), the columns of benchmarks/real_models.py;
`own` is timm's `set_grad_checkpointing(True)` or torchvision DenseNet's
`memory_efficient=True`.

torchvision and timm need a torch other than the one the README pins, in a
virtual environment of their own (README, "The model zoos"):

    python -m venv .zoo && .zoo/bin/pip install torch==2.14.1 torchvision==0.29.1 -e ".[zoo]"
    .zoo/bin/python benchmarks/zoo.py [--only NAME ...] [--out benchmarks/results]
"""
import argparse
import datetime
import importlib.util
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import zoo  # noqa: E402

# the columns of benchmarks/real_models.py (its name is taken by tests/real_models.py on the path)
_spec = importlib.util.spec_from_file_location("bench_real_models", Path(__file__).resolve().parent / "real_models.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

from memfit.report import write_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=[], help="models whose names contain one of these")
    ap.add_argument("--batch", type=int, default=8, help="batch size (the tests use 2)")
    ap.add_argument("--scale", type=int, default=2, help="images this many times the tests' side (32 -> 64)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    zoo.B, zoo.SCALE = args.batch, args.scale
    rows = []
    for name, build in zoo.ZOO.items():
        if args.only and not any(o in name for o in args.only):
            continue
        torch.manual_seed(0)
        rows.append(bench.row(name, *build(), turn_on=zoo.own_checkpointing))
        print(f"{name}: done", flush=True)
    bench.render(f"memfit on the model zoos (CPU, torch {torch.__version__})", rows)
    import timm
    import torchvision
    date = datetime.date.today().isoformat()
    path = Path(args.out) / f"zoo-cpu-{date}.json"
    write_json(path, {"device": f"cpu ({platform.processor() or platform.machine()})", "date": date,
                      "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                      "batch": args.batch, "scale": args.scale,
                      "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
