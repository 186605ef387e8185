"""Per-frame importance: exact with checkpointing equals exact without, and the
cache survives kills and corruption."""

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from memfit import MemfitError
from memfit.attribution import (
    Cache,
    attribute,
    checkpoint_model,
    choose_checkpointing,
    compare_scores,
    simulated_peak,
)
from memfit.attribution.cache import weights_hash
from memfit.core.memory import track_memory
from memfit.models import video


def tiny(n=3):
    model, (clips, _), _ = video.build("tiny", batch_size=n)
    return model, {f"video_{i:03d}": clips[i] for i in range(n)}


def test_exact_with_checkpointing_is_identical_and_smaller():
    model, videos = tiny(2)
    clip = {"video_000": videos["video_000"]}
    with track_memory(model) as plain_mem:
        plain = attribute(model, clip)
    checkpoint_model(model)
    with track_memory(model) as ckpt_mem:
        ckpt = attribute(model, clip)
    assert ckpt["video_000"]["scores"] == plain["video_000"]["scores"]  # bitwise, CPU fp32
    assert ckpt_mem.peak_bytes < plain_mem.peak_bytes
    assert sum(plain["video_000"]["scores"]) == pytest.approx(1.0)


def test_budget_chooses_the_least_recomputation_that_fits():
    model, videos = tiny(1)
    clip = videos["video_000"]
    with track_memory(model) as plain_mem:
        plain = attribute(model, videos, {"video_000": 1})
    assert simulated_peak(model, clip, "none") == plain_mem.peak_bytes  # the simulation is exact here
    blocks = simulated_peak(model, clip, "blocks")
    budget = (blocks + plain_mem.peak_bytes) // 2
    strategy, predicted, without = choose_checkpointing(model, clip, budget=budget)
    assert without == plain_mem.peak_bytes and predicted <= budget and strategy != "none"
    with track_memory(model) as mem:
        fitted = attribute(model, videos, {"video_000": 1})
    assert fitted == plain and mem.peak_bytes <= budget and abs(mem.peak_bytes / predicted - 1) < 0.01
    assert choose_checkpointing(model, clip, budget="100%")[0] == "none"
    with pytest.raises(MemfitError, match="below the smallest attribution peak"):
        choose_checkpointing(model, clip, strategy="plan:" + str(blocks // 2))


def test_chunked_is_an_approximation_and_is_measured():
    model, videos = tiny(1)
    exact = attribute(model, videos)["video_000"]
    chunked = attribute(model, videos, mode="chunked", chunk_size=2)["video_000"]
    assert chunked["chunks"] == 4 and exact["target"] == chunked["target"]
    c = compare_scores(exact["scores"], chunked["scores"], k=3)
    x, y = np.array(exact["scores"]), np.array(chunked["scores"])
    assert c["max_rel_error"] == pytest.approx(np.max(np.abs(x - y) / np.abs(x))) and c["max_rel_error"] > 0
    assert c["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1]) and c["pearson"] < 1
    top = lambda v: set(np.argsort(-v)[:3].tolist())  # noqa: E731
    assert c["top_k_agreement"] == len(top(x) & top(y)) / 3
    assert compare_scores(exact["scores"], exact["scores"])["max_rel_error"] == 0


def make_cache(root, model, mode="chunked"):
    return Cache(root, "video-tiny", weights_hash(model), {"mode": mode, "chunk_size": 2})


def test_a_killed_run_resumes_from_the_cache(tmp_path):
    script = textwrap.dedent("""
        import os, signal, sys
        from memfit.attribution import Cache, attribute
        from memfit.attribution.cache import weights_hash
        from memfit.models import video
        model, (clips, _), _ = video.build("tiny", batch_size=3)
        videos = {f"video_{i:03d}": clips[i] for i in range(3)}
        cache = Cache(sys.argv[1], "video-tiny", weights_hash(model), {"mode": "chunked", "chunk_size": 2})
        done = []
        def progress(video, chunk, total):
            done.append(chunk)
            if len(done) == 5:                 # killed between chunks, mid-video
                os.kill(os.getpid(), signal.SIGKILL)
        attribute(model, videos, mode="chunked", chunk_size=2, cache=cache, progress=progress)
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")], capture_output=True, timeout=300)
    assert r.returncode == -9, r.stderr
    model, videos = tiny()
    cache = make_cache(tmp_path / "cache", model)
    assert len(cache.names()) == 5
    resumed = attribute(model, videos, mode="chunked", chunk_size=2, cache=cache)
    assert len(cache.reused) == 5 and not cache.corrupt
    fresh = attribute(model, videos, mode="chunked", chunk_size=2, cache=make_cache(tmp_path / "fresh", model))
    assert resumed == fresh
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_corrupt_file_is_detected_and_recomputed(tmp_path):
    model, videos = tiny(1)
    first = attribute(model, videos, mode="chunked", chunk_size=2, cache=make_cache(tmp_path, model))
    cache = make_cache(tmp_path, model)
    (victim,) = cache.dir.glob("video_000_*_chunk_001.pt")
    victim.write_bytes(victim.read_bytes()[:50])  # truncated
    again = attribute(model, videos, mode="chunked", chunk_size=2, cache=cache)
    assert cache.corrupt == [victim.stem] and again == first
    assert make_cache(tmp_path, model).get(victim.stem) is not None  # rewritten, valid again


def test_changed_weights_or_config_do_not_reuse_the_cache(tmp_path):
    model, videos = tiny(1)
    attribute(model, videos, mode="chunked", chunk_size=2, cache=make_cache(tmp_path, model))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    changed = make_cache(tmp_path, model)
    assert not changed.names()
    other = Cache(tmp_path, "video-tiny", weights_hash(model), {"mode": "chunked", "chunk_size": 4})
    assert other.dir != changed.dir and len(list(tmp_path.iterdir())) == 3  # the old cache is kept


def test_bad_input(tmp_path):
    model, videos = tiny(1)
    for size in (0, 9):
        with pytest.raises(MemfitError, match="chunk size"):
            attribute(model, videos, mode="chunked", chunk_size=size)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MemfitError, match="cannot write the cache directory"):
        make_cache(blocker / "cache", model)
    with pytest.raises(MemfitError, match="unknown reduction"):
        attribute(model, videos, reduce="l3")


def write_frames(directory, n, sizes=None, skip=None):
    import numpy as np
    from PIL import Image

    directory.mkdir()
    for i in range(n):
        if i != skip:
            size = (sizes or {}).get(i, 16)
            pixels = (np.random.rand(size, size, 3) * 255).astype("uint8")
            Image.fromarray(pixels).save(directory / f"frame_{i:03d}.png")


def test_cli_on_files_with_cache_and_outputs(tmp_path, cli):
    import numpy as np

    _, videos = tiny(2)
    paths = []
    for vid, clip in videos.items():
        np.save(tmp_path / f"{vid}.npy", clip.numpy())
        paths.append(str(tmp_path / f"{vid}.npy"))
    write_frames(tmp_path / "clip_dir", 8)
    args = [
        *paths,
        str(tmp_path / "clip_dir"),
        "--size",
        "tiny",
        "--mode",
        "chunked",
        "--chunk-size",
        "4",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
        "--json",
        str(tmp_path / "r.json"),
    ]
    r = cli("attribute", *args)
    assert r.returncode == 0, r.stderr
    assert "0 chunks reused" in r.stdout
    assert (tmp_path / "out" / "video_000.csv").exists() and (tmp_path / "out" / "classes.png").exists()
    again = cli("attribute", *args)
    assert "6 chunks reused" in again.stdout
    import json

    assert len(json.loads((tmp_path / "r.json").read_text())["clip_dir"]["scores"]) == 8


def test_cli_compare_json(tmp_path, cli):
    import numpy as np

    _, videos = tiny(1)
    np.save(tmp_path / "v.npy", videos["video_000"].numpy())
    r = cli(
        "attribute",
        str(tmp_path / "v.npy"),
        "--size",
        "tiny",
        "--compare",
        "--chunk-size",
        "4",
        "--json",
        str(tmp_path / "c.json"),
    )
    assert r.returncode == 0, r.stderr
    import json

    report = json.loads((tmp_path / "c.json").read_text())
    assert set(report["modes"]) == {"exact", "exact_nockpt", "chunked"}
    assert all({"peak_bytes", "time_s"} <= set(m) for m in report["modes"].values())
    pairs = {(c["a"], c["b"]): c for c in report["comparisons"]}
    assert pairs[("exact", "exact_nockpt")]["max_rel_error"] == 0
    assert report["modes"]["exact"]["peak_bytes"] < report["modes"]["exact_nockpt"]["peak_bytes"]
    assert {"max_rel_error", "pearson", "top_k_agreement"} <= set(pairs[("chunked", "exact")])


def test_cli_bad_input_keeps_the_cache(tmp_path, cli, capsys):
    """The good run as a user starts it, the bad inputs in this process (as tests/test_cli.py runs them)."""
    import numpy as np

    from memfit.cli import main

    _, videos = tiny(1)
    np.save(tmp_path / "v.npy", videos["video_000"].numpy())
    np.save(tmp_path / "flat.npy", np.zeros((8, 16, 16), dtype="float32"))
    ok = cli("attribute", str(tmp_path / "v.npy"), "--size", "tiny", "--cache-dir", str(tmp_path / "cache"))
    assert ok.returncode == 0
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*"))
    write_frames(tmp_path / "gaps", 5, skip=2)
    write_frames(tmp_path / "mixed", 4, sizes={3: 20})
    (tmp_path / "file").write_text("x")
    for args, message in [
        (["missing.npy"], "does not exist"),
        ([str(tmp_path / "flat.npy")], "must be 4-dimensional"),
        ([str(tmp_path / "gaps")], "gaps (missing number 2)"),
        ([str(tmp_path / "mixed")], "mixed sizes"),
        ([str(tmp_path / "v.npy"), "--mode", "chunked", "--chunk-size", "0"], "chunk size 0 must be between 1"),
        ([str(tmp_path / "v.npy"), "--mode", "chunked", "--chunk-size", "9"], "chunk size 9 must be between 1"),
        ([str(tmp_path / "v.npy"), "--cache-dir", str(tmp_path / "file" / "c")], "cannot write the cache"),
    ]:
        cache = [] if "--cache-dir" in args else ["--cache-dir", str(tmp_path / "cache")]
        assert main(["attribute", *args, "--size", "tiny", *cache]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == cached


FACTORY = """
from memfit.models import video


def make(seed=0):
    return video.build("tiny", batch_size=2, seed=seed)
"""


def test_cli_user_model_budget_and_per_video_targets(tmp_path, cli, capsys, monkeypatch):
    import json

    import numpy as np

    model, videos = tiny(2)
    for vid, clip in videos.items():
        np.save(tmp_path / f"{vid}.npy", clip.numpy())
    (tmp_path / "mymodels.py").write_text(FACTORY)
    files = [str(tmp_path / f"{vid}.npy") for vid in videos]
    r = cli(
        "attribute",
        *files,
        "--model",
        "mymodels:make",
        "--budget",
        "90%",
        "--target",
        "video_001=2",
        "--target",
        "1",
        "--json",
        str(tmp_path / "r.json"),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "budget 90%: checkpointing" in r.stdout and "measured peak" in r.stdout
    got = json.loads((tmp_path / "r.json").read_text())
    from memfit.cli import main

    assert {v: g["target"] for v, g in got.items()} == {"video_000": 1, "video_001": 2}
    expected = attribute(model, videos, {"video_000": 1, "video_001": 2})  # the factory's model, no checkpointing
    assert {v: g["scores"] for v, g in got.items()} == {v: e["scores"] for v, e in expected.items()}
    for args, message in [
        (["--target", "video_009=1"], "names no video given"),
        (["--target", "cat"], "is not a class"),
        (["--target", "7"], "target class 7 is out of range"),
        (["--budget", "1KiB"], "below the smallest attribution peak"),
        (["--budget", "50%", "--strategy", "blocks"], "not both"),
        (["--model", "mymodels:nothing"], "has no function 'nothing'"),
    ]:
        monkeypatch.chdir(tmp_path)  # the bad inputs in this process, where a user's factory is found the same way
        assert main(["attribute", *files, *(args if "--model" in args else ["--model", "mymodels:make", *args])]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


def test_a_new_clip_with_an_old_name_is_not_served_the_old_gradients(tmp_path):
    model, videos = tiny(2)
    first = attribute(
        model, {"clip": videos["video_000"]}, mode="chunked", chunk_size=2, cache=make_cache(tmp_path, model)
    )
    cache = make_cache(tmp_path, model)
    second = attribute(model, {"clip": videos["video_001"]}, mode="chunked", chunk_size=2, cache=cache)
    assert not cache.reused and second != first
    assert second == attribute(model, {"clip": videos["video_001"]}, mode="chunked", chunk_size=2)


def test_targets_key_each_chunk_so_a_subset_reuses_its_chunks(tmp_path):
    model, videos = tiny(2)
    attribute(
        model, videos, {"video_000": 1, "video_001": 2}, mode="chunked", chunk_size=2, cache=make_cache(tmp_path, model)
    )
    cache = make_cache(tmp_path, model)
    attribute(model, {"video_000": videos["video_000"]}, {"video_000": 1}, mode="chunked", chunk_size=2, cache=cache)
    assert len(cache.reused) == 4
    cache = make_cache(tmp_path, model)
    attribute(model, {"video_000": videos["video_000"]}, {"video_000": 2}, mode="chunked", chunk_size=2, cache=cache)
    assert not cache.reused  # another target is another gradient


def test_concurrent_runs_sharing_a_cache_keep_every_chunk(tmp_path):
    script = textwrap.dedent("""
        import sys
        from memfit.attribution import Cache, attribute
        from memfit.attribution.cache import weights_hash
        from memfit.models import video
        model, (clips, _), _ = video.build("tiny", batch_size=4)
        first = int(sys.argv[2])
        videos = {f"video_{i:03d}": clips[i] for i in range(first, first + 2)}
        cache = Cache(sys.argv[1], "video-tiny", weights_hash(model), {"mode": "chunked", "chunk_size": 2})
        attribute(model, videos, mode="chunked", chunk_size=2, cache=cache)
    """)
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(first)]) for first in (0, 2)]
    assert [r.wait(timeout=300) for r in runs] == [0, 0]
    model, _ = tiny(1)
    cache = make_cache(tmp_path, model)
    assert len(cache.names()) == 16 and all(cache.get(n) is not None for n in cache.names()) and not cache.corrupt


def test_cli_same_file_name_in_two_directories_gives_two_results(tmp_path, cli):
    import json

    import numpy as np

    _, videos = tiny(2)
    for d, clip in zip("ab", videos.values()):
        (tmp_path / d).mkdir()
        np.save(tmp_path / d / "clip_000.npy", clip.numpy())
    r = cli(
        "attribute",
        str(tmp_path / "a" / "clip_000.npy"),
        str(tmp_path / "b" / "clip_000.npy"),
        "--size",
        "tiny",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "r.json").read_text())
    assert set(got) == {"a-clip_000", "b-clip_000"} and got["a-clip_000"] != got["b-clip_000"]


def test_cli_bad_target_fails_before_any_chunk_and_temporary_caches_go(tmp_path, cli):
    import os

    import numpy as np

    _, videos = tiny(2)
    files = []
    for vid, clip in videos.items():
        np.save(tmp_path / f"{vid}.npy", clip.numpy())
        files.append(str(tmp_path / f"{vid}.npy"))
    bad = cli("attribute", *files, "--size", "tiny", "--target", "video_001=99", "--cache-dir", str(tmp_path / "cache"))
    assert bad.returncode == 2 and "out of range for video_001" in bad.stderr, bad.stderr
    assert not list((tmp_path / "cache").rglob("*.pt"))
    (tmp_path / "tmp").mkdir()
    ok = subprocess.run(
        [sys.executable, "-m", "memfit", "attribute", *files, "--size", "tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
    )
    assert ok.returncode == 0, ok.stderr
    assert not list((tmp_path / "tmp").iterdir())


def test_inputs_are_checked_by_the_library_before_any_work():
    from memfit.attribution import check_inputs

    model, videos = tiny(1)
    with pytest.raises(MemfitError, match="target class 99 is out of range for video_000"):
        check_inputs(model, videos, {"video_000": 99})
    with pytest.raises(MemfitError, match="chunk size 0 must be between 1 and the clips'"):
        check_inputs(model, videos, mode="chunked", chunk_size=0)
    with pytest.raises(MemfitError, match="this model takes up to"):
        check_inputs(model, {"wide": torch.zeros(2, 3, 5, 5)})
    check_inputs(model, videos, {"video_000": 1}, mode="chunked", chunk_size=2)


@pytest.mark.parametrize("reduce, times_input", [("l2", False), ("l1", False), ("max", True)])
def test_scores_are_the_per_frame_gradient_norms_computed_directly(reduce, times_input):
    """attribute() against torch.autograd.grad on the plain model: exact mode (checkpointed) gives the norms of
    the whole clip's gradient per frame; chunked mode those of each chunk's own gradient."""
    model, videos = tiny(1)
    clip = videos["video_000"]
    plain = copy.deepcopy(model).eval()
    target = int(plain(clip[None]).argmax(1))
    norm = {
        "l2": lambda g: g.flatten(1).double().norm(dim=1),
        "l1": lambda g: g.flatten(1).double().abs().sum(1),
        "max": lambda g: g.flatten(1).double().abs().amax(1),
    }[reduce]

    def direct(frames):
        x = frames[None].clone().requires_grad_(True)
        g = torch.autograd.grad(plain(x)[0, target], x)[0][0]
        return g * frames if times_input else g

    def normalised(g):
        s = norm(g)
        return (s / s.sum()).tolist()

    checkpoint_model(model)
    exact = attribute(model, videos, {"video_000": target}, reduce=reduce, times_input=times_input)["video_000"]
    assert exact["scores"] == normalised(direct(clip))
    chunked = attribute(
        model, videos, {"video_000": target}, mode="chunked", chunk_size=2, reduce=reduce, times_input=times_input
    )["video_000"]
    assert chunked["scores"] == normalised(torch.cat([direct(clip[s : s + 2]) for s in range(0, clip.shape[0], 2)]))
