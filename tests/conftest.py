"""What several test files share."""

import os
import subprocess
import sys

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the two cores: one thread each, not two, and
    os.environ["OMP_NUM_THREADS"] = "1"  # the same in the processes they start (a CLI run's numbers are
    torch.set_num_threads(1)  # compared with this process's to the bit)


def run_memfit(*args, cwd=None, timeout=900):
    """`python -m memfit ARGS` in a new process: its exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "memfit", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


@pytest.fixture
def cli():
    """`cli("verify", "--model", ...)`: the memfit command line, as a user runs it."""
    return run_memfit


# The files that take longest, longest first (measured with --durations=0 on 2 cores): two workers that take
# whole files (`--dist loadfile`) finish together when the long ones start first and the short ones fill in.
LONGEST_FIRST = [
    "test_train.py",
    "test_verification.py",
    "test_compat.py",
    "test_planner.py",
    "test_distributed.py",
    "test_real_models.py",
    "test_stacks.py",
    "test_integrations.py",
    "test_attribution.py",
    "test_fit.py",
    "test_cli.py",
    "test_bench.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order
