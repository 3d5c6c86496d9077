"""The local executor end to end: output, verify, paths, resume, refusals, bad input, memory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from core.checkpoint import Checkpoint
from planners.plan import Plan
from rewriter.exec.publish.verify import verify
from rewriter.exec.run.executor import execute
from rewriter.tools.synth import PRESETS, Geometry, synthetic_saliency, write_checkpoint
from tests.conftest import cli, source_digest, tree_digest


def _plan(src: Path, tmp: Path, *extra: str) -> Path:
    sal = tmp / "sal.json"
    c = Checkpoint.open(str(src))
    lay = c.layout
    synthetic_saliency(len(lay.moe_layers(c)), lay.num_experts(c.config), lay.top_k(c.config), seed=2).save(sal)
    plan = tmp / "plan.json"
    cli("plan", src, "--saliency", sal, "--keep-frac", "0.5", "--out", plan, *extra)
    return plan


def test_run_writes_complete_verified_checkpoint(tiny, tmp_path):
    plan = _plan(tiny, tmp_path, "--max-shard-size", "60KB")
    before = source_digest(tiny)
    out = cli("run", plan, "--out", tmp_path / "dst", "--quiet")
    assert "wrote" in out
    assert "left out 1 source files (original/model.safetensors)" in out
    dst = tmp_path / "dst"
    names = sorted(p.name for p in dst.iterdir())
    assert "model.safetensors.index.json" in names and "pruning.json" in names
    assert "tokenizer.json" in names and "generation_config.json" in names
    assert not (dst / "original").exists() and not (dst / ".rewriter").exists()
    c = Checkpoint.open(str(dst))
    assert len(c.shards) > 1
    assert c.config["num_local_experts"] == 4
    assert c.tensors["model.layers.0.mlp.router.weight"].shape == (4, 64)
    prov = json.loads((dst / "pruning.json").read_text())
    assert prov["plan_digest"] == Plan.load(str(plan)).digest
    assert prov["skipped_files"] == ["original/model.safetensors"]
    assert set(prov["expert_mapping"]) == {"0", "1"}
    report = verify(str(tiny), str(dst))
    assert report.ok and report.tensors_checked == len(c.tensors)
    assert "OK" in cli("verify", tiny, dst)
    assert source_digest(tiny) == before
    # Standard loaders read it.
    from safetensors import safe_open
    for shard in c.shards:
        with safe_open(str(dst / shard), "numpy") as f:
            assert set(f.keys()) == set(c.shards[shard].tensors)


def test_verify_detects_a_flipped_byte(tiny, tmp_path):
    plan = _plan(tiny, tmp_path)
    cli("run", plan, "--out", tmp_path / "dst", "--quiet")
    c = Checkpoint.open(str(tmp_path / "dst"))
    t = c.tensors["model.layers.1.mlp.experts.down_proj_scales"]
    with open(tmp_path / "dst" / t.shard, "r+b") as f:
        f.seek(t.begin + 5)
        b = f.read(1)
        f.seek(t.begin + 5)
        f.write(bytes([b[0] ^ 1]))
    out = cli("verify", tiny, tmp_path / "dst", expect=1)
    assert "mismatch: model.layers.1.mlp.experts.down_proj_scales" in out and "FAILED" in out


def test_zero_copy_buffered_and_memory_destination_identical(tiny, tmp_path):
    plan = _plan(tiny, tmp_path)
    p = Plan.load(str(plan))
    r1 = execute(p, str(tmp_path / "a"))
    r2 = execute(p, str(tmp_path / "b"), zero_copy=False, buffer_bytes=4096)
    assert r1.shards[0].zero_copy_bytes > 0 and r2.shards[0].zero_copy_bytes == 0
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    execute(p, "memory://mem-dst", buffer_bytes=8192)
    fs = fsspec.filesystem("memory")
    for name, digest in tree_digest(tmp_path / "a").items():
        import hashlib
        assert hashlib.sha256(fs.cat_file(f"/mem-dst/{name}")).hexdigest() == digest, name
    assert verify(str(tiny), "memory://mem-dst").ok


def test_memory_source_reads_only_kept_bytes(tiny, tmp_path):
    from rewriter.exec.io.copy import IOOptions
    fs = fsspec.filesystem("memory")
    for f in tiny.rglob("*"):
        if f.is_file():
            fs.pipe_file(f"/mem-src/{f.relative_to(tiny).as_posix()}", f.read_bytes())
    sal = tmp_path / "s.json"
    synthetic_saliency(2, 8, 2, seed=2).save(sal)
    cli("plan", "memory://mem-src", "--saliency", sal, "--keep-frac", "0.5", "--out", tmp_path / "p.json")
    p = Plan.load(str(tmp_path / "p.json"))
    from core.storage import Storage
    from rewriter.exec.dest.destination import open_destination
    from rewriter.exec.run.executor import write_output_shard
    src, dst = Storage("memory://mem-src"), open_destination(str(tmp_path / "o"))
    os.makedirs(tmp_path / "o")
    total = 0
    for out in p.outputs:
        total += write_output_shard(out, src, dst, buffer_bytes=4096, io=IOOptions(max_gap=0)).bytes_read
    assert src.counter.bytes == total == p.total_size


def test_rerun_on_complete_output_does_nothing(tiny, tmp_path):
    plan = _plan(tiny, tmp_path)
    cli("run", plan, "--out", tmp_path / "dst", "--quiet")
    before = tree_digest(tmp_path / "dst")
    assert "already holds the complete output" in cli("run", plan, "--out", tmp_path / "dst", "--quiet")
    assert tree_digest(tmp_path / "dst") == before


def test_refuses_destination_in_source_and_foreign_output(tiny, tmp_path):
    plan = _plan(tiny, tmp_path)
    assert "the source is never modified" in cli("run", plan, "--out", tiny, expect=2)
    assert "the source is never modified" in cli("run", plan, "--out", tiny / "sub", expect=2)
    assert "the source is never modified" in cli("run", plan, "--out", tiny.parent, expect=2)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert "files this tool did not write" in cli("run", plan, "--out", tmp_path / "busy", expect=2)
    cli("run", plan, "--out", tmp_path / "dst", "--quiet")
    other = _plan(tiny, tmp_path / "..", "--keep-n", "2") if False else None
    sal = tmp_path / "s2.json"
    synthetic_saliency(2, 8, 2, seed=9).save(sal)
    cli("plan", tiny, "--saliency", sal, "--keep-n", "2", "--out", tmp_path / "plan2.json")
    assert "output of another plan" in cli("run", tmp_path / "plan2.json", "--out", tmp_path / "dst", expect=2)
    cli("run", tmp_path / "plan2.json", "--out", tmp_path / "dst", "--force", "--quiet")
    assert verify(str(tiny), str(tmp_path / "dst")).ok
    assert Checkpoint.open(str(tmp_path / "dst")).config["num_local_experts"] == 2
    assert other is None


def test_nonuniform_plan_needs_permission(tiny, tmp_path):
    sal = tmp_path / "s.json"
    synthetic_saliency(2, 8, 2, seed=5).save(sal)
    cli("plan", tiny, "--saliency", sal, "--budget", "9", "--out", tmp_path / "p.json")
    assert "--allow-nonuniform" in cli("run", tmp_path / "p.json", "--out", tmp_path / "d", expect=2)
    cli("run", tmp_path / "p.json", "--out", tmp_path / "d", "--allow-nonuniform", "--quiet")
    assert verify(str(tiny), str(tmp_path / "d")).ok


# --- bad input: clear error, source untouched, nothing complete-looking left ---------------------

def _assert_no_complete_output(dst: Path) -> None:
    assert not (dst / "model.safetensors.index.json").exists()


def test_truncated_source_shard(fresh_tiny, tmp_path):
    plan = _plan(fresh_tiny, tmp_path)
    shard = sorted(fresh_tiny.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    before = source_digest(fresh_tiny)
    out = cli("run", plan, "--out", tmp_path / "dst", expect=2)
    assert shard.name in out and "truncated" in out
    assert source_digest(fresh_tiny) == before
    _assert_no_complete_output(tmp_path / "dst")


def test_corrupt_header_at_plan_time(fresh_tiny, tmp_path):
    shard = sorted(fresh_tiny.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.seek(0)
        f.write((10**9).to_bytes(8, "little"))
    before = source_digest(fresh_tiny)
    sal = tmp_path / "s.json"
    synthetic_saliency(2, 8, 2).save(sal)
    out = cli("prune", fresh_tiny, tmp_path / "dst", "--saliency", sal, "--keep-n", "4", expect=2)
    assert shard.name in out and "exceeds the limit" in out
    assert source_digest(fresh_tiny) == before
    _assert_no_complete_output(tmp_path / "dst")


def test_missing_shard_and_traversal(fresh_tiny, tmp_path):
    sal = tmp_path / "s.json"
    synthetic_saliency(2, 8, 2).save(sal)
    index = fresh_tiny / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.norm.weight"] = "../../etc/x.safetensors"
    index.write_text(json.dumps(doc))
    before = source_digest(fresh_tiny)
    out = cli("prune", fresh_tiny, tmp_path / "dst", "--saliency", sal, "--keep-n", "4", expect=2)
    assert "'../../etc/x.safetensors'" in out and "without '..'" in out
    assert source_digest(fresh_tiny) == before
    _assert_no_complete_output(tmp_path / "dst")
    doc["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(doc))
    before = source_digest(fresh_tiny)
    out = cli("prune", fresh_tiny, tmp_path / "dst", "--saliency", sal, "--keep-n", "4", expect=2)
    assert "model-00009-of-00009.safetensors" in out
    assert source_digest(fresh_tiny) == before
    _assert_no_complete_output(tmp_path / "dst")


def test_saliency_for_another_model_and_keep_below_top_k(tiny, tmp_path):
    sal = tmp_path / "s.json"
    synthetic_saliency(24, 32, 4).save(sal)
    before = source_digest(tiny)
    out = cli("prune", tiny, tmp_path / "dst", "--saliency", sal, "--keep-n", "4", expect=2)
    assert "s.json" in out and "another model" in out
    synthetic_saliency(2, 8, 2).save(sal)
    out = cli("prune", tiny, tmp_path / "dst", "--saliency", sal, "--keep-n", "1", expect=2)
    assert "fewer than the routing top-k of 2" in out
    assert source_digest(tiny) == before
    assert not (tmp_path / "dst").exists()


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs: a destination that runs out of space."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_destination_disk_full(small_fs, tmp_path):
    g = Geometry(2, 16, 2, 256, 256, 512, 4, 2, 64, 2_000_000)
    src = tmp_path / "src"
    write_checkpoint(src, g)
    plan = _plan(src, tmp_path)
    assert Plan.load(str(plan)).total_size > 1 << 20
    before = source_digest(src)
    out = cli("run", plan, "--out", small_fs / "dst", "--quiet", expect=2)
    assert "no space left" in out and str(small_fs / "dst") in out
    assert source_digest(src) == before
    _assert_no_complete_output(small_fs / "dst")
    assert not list((small_fs / "dst").glob("*.safetensors"))


# --- resume after SIGKILL ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    src = tmp_path_factory.mktemp("medium") / "src"
    write_checkpoint(src, PRESETS["small"])
    return src


def _run_cmd(plan: Path, dst: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rewriter.cli", "run", str(plan), "--out", str(dst), "--quiet", *extra]


def _kill_when(cmd: list[str], ready) -> int:
    """Start cmd, SIGKILL it once ready() is true; return its exit status."""
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    return proc.wait()


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(medium, tmp_path):
    plan = _plan(medium, tmp_path, "--max-shard-size", "6MB")
    ref = tmp_path / "ref"
    subprocess.run(_run_cmd(plan, ref), check=True)
    expected = tree_digest(ref)
    assert len([n for n in expected if n.endswith(".safetensors")]) >= 3

    def journal_shards(dst):
        try:
            return len(json.loads((dst / ".rewriter" / "journal.json").read_text())["shards"])
        except (OSError, ValueError, KeyError):
            return 0

    moments = {
        "mid-shard": lambda d: any((d / ".rewriter" / "tmp").glob("*.part")),
        "after one shard": lambda d: journal_shards(d) >= 1,
        "after two shards": lambda d: journal_shards(d) >= 2,
        "finalizing": lambda d: (d / "config.json").exists(),
    }
    killed = 0
    for label, ready in moments.items():
        dst = tmp_path / label.replace(" ", "-")
        status = _kill_when(_run_cmd(plan, dst, "--no-zero-copy", "--buffer-mib", "1"), lambda ready=ready, dst=dst: ready(dst))
        killed += status == -signal.SIGKILL
        if status == -signal.SIGKILL:
            assert not (dst / "model.safetensors.index.json").exists() or label == "finalizing"
        subprocess.run(_run_cmd(plan, dst), check=True)
        assert tree_digest(dst) == expected, label
        assert not (dst / ".rewriter").exists()
    assert killed >= 2, "the runs finished before they could be killed"


@pytest.mark.slow
def test_resume_redoes_a_damaged_journaled_shard(medium, tmp_path):
    plan = _plan(medium, tmp_path, "--max-shard-size", "6MB")
    ref = tmp_path / "ref"
    subprocess.run(_run_cmd(plan, ref), check=True)
    dst = tmp_path / "dst"
    status = _kill_when(_run_cmd(plan, dst, "--no-zero-copy", "--buffer-mib", "1"),
                        lambda: (dst / ".rewriter" / "journal.json").exists()
                        and len(json.loads((dst / ".rewriter" / "journal.json").read_text() or "{}").get("shards", {})) >= 1)
    assert status == -signal.SIGKILL
    journal = json.loads((dst / ".rewriter" / "journal.json").read_text())
    done = next(iter(journal["shards"]))
    with open(dst / done, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    subprocess.run(_run_cmd(plan, dst), check=True)
    assert tree_digest(dst) == tree_digest(ref)


# --- bounded memory ----------------------------------------------------------------------------

def _peak_rss_of(cmd: list[str]) -> int:
    """Peak RSS of a child: its own high-water mark, cross-checked by sampling from outside."""
    import psutil

    proc = subprocess.Popen([*cmd, "--json"], stdout=subprocess.PIPE, text=True)
    sampled = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            sampled = max(sampled, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    out, _ = proc.communicate()
    assert proc.returncode == 0, cmd
    reported = json.loads(out)["peak_rss_bytes"]
    assert 0 < sampled <= reported * 1.05 + (1 << 20)
    return reported


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero-copy", "buffered"])
def test_memory_bounded_whatever_the_shard_size(tmp_path, mode):
    # One 3.4 GB shard of two real-size 120B MoE layers (sparse), keep 32 of 128.
    g = Geometry(2, 128, 4, 2880, 2880, 1024, 64, 8, 64, 10**10)
    src = tmp_path / "src"
    write_checkpoint(src, g, sparse=True)
    shard = next(src.glob("model-*.safetensors"))
    assert shard.stat().st_size > 3 << 30
    sal = tmp_path / "s.json"
    synthetic_saliency(2, 128, 4).save(sal)
    cli("plan", src, "--saliency", sal, "--keep-n", "32", "--out", tmp_path / "p.json")
    extra = ["--buffer-mib", "16"] + (["--no-zero-copy"] if mode == "buffered" else [])
    peak = _peak_rss_of(_run_cmd(tmp_path / "p.json", tmp_path / "dst", *extra))
    written = sum(p.stat().st_size for p in (tmp_path / "dst").glob("*.safetensors"))
    assert written > 800 << 20
    assert peak < 200 << 20, f"peak RSS {peak >> 20} MiB"


def test_drop_cache_and_measured_bandwidth(tiny, tmp_path):
    from rewriter.exec.io.probe import measure_disk

    read_bw, write_bw = measure_disk(str(tmp_path), nbytes=16 << 20, block=4 << 20)
    assert read_bw > 0 and write_bw > 0
    plan = _plan(tiny, tmp_path, "--measure-bandwidth", str(tmp_path))
    out = cli("plan", tiny, "--saliency", tmp_path / "sal.json", "--keep-frac", "0.5",
              "--measure-bandwidth", str(tmp_path), "--json")
    cost = json.loads(out)["cost"]
    assert cost["read_bytes_per_s"] != 1e9 and cost["write_bytes_per_s"] != 1e9
    cli("run", plan, "--out", tmp_path / "a", "--quiet")
    cli("run", plan, "--out", tmp_path / "b", "--quiet", "--drop-cache")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
