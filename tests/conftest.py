"""What several test files share."""
import subprocess
import sys

import pytest


def run_memfit(*args, cwd=None, timeout=900):
    """`python -m memfit ARGS` in a new process: its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "memfit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


@pytest.fixture
def cli():
    """`cli("verify", "--model", ...)`: the memfit command line, as a user runs it."""
    return run_memfit
