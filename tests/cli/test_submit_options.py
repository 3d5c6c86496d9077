"""`rewriter submit` takes `rewriter run`'s options and hands them on unchanged (no cluster needed)."""

from __future__ import annotations

from rewriter.cli import main
from rewriter.cli.jobs import NOT_FORWARDED, forwarded_args


def _names(cmd) -> list[str]:
    return [p.name for p in cmd.params]


def test_submit_has_the_run_options():
    run, submit = main.commands["run"], main.commands["submit"]
    forwarded = [n for n in _names(run) if n not in NOT_FORWARDED]
    assert _names(submit)[: len(forwarded)] == forwarded
    assert set(_names(submit)) - set(forwarded) == {"submission_id", "timeout", "address"}
    sctx, rctx = submit.make_context("submit", ["--help"], resilient_parsing=True), run.make_context("run", ["--help"], resilient_parsing=True)
    ours = {p.name: p.get_help_record(sctx) for p in submit.params if p.name in forwarded and p.name != "plan_file"}
    assert ours == {p.name: p.get_help_record(rctx) for p in run.params if p.name in ours}  # same help, defaults


def test_forwarded_options_parse_back_to_the_same_values():
    run, submit = main.commands["run"], main.commands["submit"]
    argv = ["p.json", "--out", "s3://b/out", "--address", "http://h:8265", "--workers", "7", "--buffer-mib", "32",
            "--force", "--dst-options", '{"endpoint_url": "http://s3:9000", "anon": true}', "--ray-timeout", "12.5",
            "--allow-nonuniform", "--quiet"]
    given = submit.make_context("submit", list(argv)).params
    args = forwarded_args(run.params, given)
    seen = run.make_context("run", ["p.json", "--out", given["dst"], *args]).params
    for name, value in given.items():
        if name in seen and name not in NOT_FORWARDED:
            assert seen[name] == value, name
    assert "--ray" not in args and "--address" not in args


def test_a_job_service_that_never_answers_is_given_up_after_timeout():
    """A port that accepts connections but never answers (a hung head node): bounded by --timeout."""
    import socket

    import pytest

    pytest.importorskip("ray")
    from tests.conftest import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # connections complete in the kernel; nothing ever reads them
        address = f"http://127.0.0.1:{s.getsockname()[1]}"
        out = cli("status", "raysubmit_x", "--address", address, "--timeout", "1", expect=2)
    assert f"error: the Ray job service at {address} did not answer within 1 s" in out
    assert "--timeout" in out
