from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from core.checkpoint import Checkpoint
from planners.saliency import model_identity
from rewriter.cli import main
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
#: Copies of the real gpt-oss-20b config.json and index (from shared/reference).
REFERENCE = Path(__file__).resolve().parent / "assets"


def cli(*args: str, expect: int | None = 0) -> str:
    """Run the CLI in-process; assert the exit code (``None``: 0 or 1); return the output."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    ok = result.exit_code in (0, 1) if expect is None else result.exit_code == expect
    assert ok, f"exit {result.exit_code}, expected {expect}:\n{result.output}"
    return result.output


def tree_digest(root: Path, skip_hidden: bool = True) -> dict[str, str]:
    """sha256 of every file under root (relative names)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not (skip_hidden and rel.startswith(".")):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The tiny MXFP4 preset: 2 layers x 8 experts, 3 shards. Read-only for tests."""
    d = tmp_path_factory.mktemp("tiny") / "ckpt"
    write_checkpoint(d, PRESETS["tiny"])
    (d / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (d / "original").mkdir()
    (d / "original" / "model.safetensors").write_bytes(b"not part of the output")
    return d


@pytest.fixture(scope="session")
def tiny_saliency(tmp_path_factory, tiny) -> Path:
    p = tmp_path_factory.mktemp("sal") / "saliency.json"
    synthetic_saliency(2, 8, 2, domain="code", seed=1, model=model_identity(Checkpoint.open(str(tiny)))).save(p)
    return p


@pytest.fixture
def fresh_tiny(tmp_path) -> Path:
    """A tiny checkpoint the test may damage."""
    d = tmp_path / "src"
    write_checkpoint(d, PRESETS["tiny"])
    return d


def source_digest(d: Path) -> dict[str, str]:
    return tree_digest(d, skip_hidden=False)


@pytest.fixture(scope="session")
def s3(tmp_path_factory, monkeypatch_session=None):
    """A real S3 API server (moto) on loopback, shared by the session."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from bench_io.s3server import start_s3

    for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        os.environ.pop(k, None)
    server = start_s3(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with 2 CPUs, shared by the Ray tests."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20)
    yield ray
    ray.shutdown()
