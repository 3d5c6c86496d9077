from __future__ import annotations

import hashlib
import os
import signal
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


#: The SIGINT handler every test must leave in place.
_SIGINT_HANDLER = pytest.StashKey[object]()


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts a background job (`make test &`, nohup, some CI runners) with SIGINT ignored,
    # and then Python installs no handler: a simulated Ctrl-C (_thread.interrupt_main) does nothing
    # and the processes the tests start inherit the ignored SIGINT. The Ctrl-C tests need what a
    # user's terminal gives, wherever the suite was started from.
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.stash[_SIGINT_HANDLER] = signal.getsignal(signal.SIGINT)


@pytest.fixture(autouse=True)
def _sigint_handler_left_as_found(request: pytest.FixtureRequest):
    """Fail the test that leaves the process's SIGINT handler changed (itself or through a fixture
    it set up), and put the handler back, so the Ctrl-C tests after it still see their interrupt."""
    expected = request.config.stash.get(_SIGINT_HANDLER, signal.default_int_handler)
    yield
    handler = signal.getsignal(signal.SIGINT)
    if handler != expected:
        signal.signal(signal.SIGINT, expected)
        pytest.fail(f"{request.node.nodeid} (or a fixture it set up) left the SIGINT handler set to "
                    f"{handler!r} instead of {expected!r}: restore it where it was changed, or the Ctrl-C "
                    "tests after this one never see their interrupt", pytrace=False)


def assert_ctrl_c_reaches_python() -> None:
    """A simulated Ctrl-C (_thread.interrupt_main) raises KeyboardInterrupt only where Python's
    handler is in place; with SIGINT ignored or left at the default it is silently dropped."""
    handler = signal.getsignal(signal.SIGINT)
    assert handler is signal.default_int_handler, (
        f"precondition: the SIGINT handler of the test process is {handler!r}, not Python's "
        "default_int_handler, so a simulated Ctrl-C would be lost before reaching the command")


def sigint_disposition(pid: int) -> str | None:
    """What process ``pid`` does on SIGINT: 'caught', 'ignored' or 'default' (None where the
    system has no /proc to say)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    bit = 1 << (signal.SIGINT - 1)
    if int(fields["SigIgn"], 16) & bit:
        return "ignored"
    return "caught" if int(fields["SigCgt"], 16) & bit else "default"


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
