"""memfit.tools.report: files appear whole or not at all, with the user's permissions."""

import json
import os

import pytest

from memfit.core.memory import fmt_bytes
from memfit.tools.report import atomic_write


def test_outputs_are_written_with_the_umask_not_0600(tmp_path):
    from memfit.tools.report import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def half(f):
        f.write("new, half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, half)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    atomic_write(path, lambda f: f.write("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_sizes_read_in_binary_units():
    assert [fmt_bytes(n) for n in (512, 2048, 3 * 2**20, 5 * 2**30)] == ["512 B", "2.0 KiB", "3.0 MiB", "5.0 GiB"]
