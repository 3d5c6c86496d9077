"""Defects found by reading the code, one test each."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest

from planners.policies import Domain, KeepPolicy
from planners.saliency import Saliency
from planners.selection import select_keep
from rewriter.exec.io.probe import measure_disk
from rewriter.exec.run.dryrun import RssSampler

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("nbytes", "block"), [(3 * 4096 + 5, 4096), (100, 4096), (8192, 4096)])
def test_measure_disk_ends_when_the_size_is_not_a_multiple_of_the_block(tmp_path, nbytes, block):
    read_bw, write_bw = measure_disk(str(tmp_path), nbytes=nbytes, block=block)
    assert read_bw > 0 and write_bw > 0
    assert list(tmp_path.iterdir()) == []


def test_rss_sampler_drops_a_sample_taken_before_reset():
    """The sampler thread reads a big RSS (the previous layer's), then reset() runs, then the
    thread stores its sample: the peak after reset must not be the previous layer's."""
    in_sample, reset_done = threading.Event(), threading.Event()
    calls = {"n": 0}

    def read_rss() -> int:
        if threading.current_thread() is threading.main_thread():
            return 100  # the reset's own reading: this layer starts at 100
        calls["n"] += 1
        if calls["n"] == 1:
            in_sample.set()
            reset_done.wait(5)
            return 10_000  # taken during the previous layer
        return 50

    with RssSampler(interval=0.001, read_rss=read_rss) as rss:
        assert in_sample.wait(5)
        rss.reset()
        reset_done.set()
        while calls["n"] < 3:
            threading.Event().wait(0.001)
        assert rss.peak == 100
    assert rss.peak == 100


def test_tiny_distinct_scores_do_not_tie_after_normalization():
    scores = (0.0, 0.0, 2.0, 5e-324)
    sal = Saliency("d", {0: {"freq": scores, "reap": scores, "eaft_reap": scores}})
    for metric in ("freq", "reap", "eaft_reap"):
        d = select_keep([Domain(sal)], [0], 4, 1, KeepPolicy(rank=metric, keep_n=2))
        assert d.keep[0] == (2, 3), metric  # 5e-324 > 0, although 5e-324 / 2 rounds to 0.0


def test_installed_packages_never_import_the_tests_folder():
    for package in ("core", "rewriter", "planners", "ray_jobs", "bench_io", "profiling", "quality"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n == "tests" or n.startswith("tests.") for n in names), path
    from bench_io.s3server import S3Server, start_s3

    assert callable(start_s3) and S3Server.options.fget is not None
