"""Ordinary mistakes get one clear `error:` line, a documented exit status, an untouched source and
nothing that blocks a re-run; outputs are never overwritten without being asked."""

from __future__ import annotations

import _thread
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from rewriter.cli import main
from rewriter.cli.errors import EXIT_STATUS_HELP
from rewriter.tools.synth import PRESETS, write_checkpoint
from tests.conftest import assert_ctrl_c_reaches_python, cli, source_digest, tree_digest
from tests.e2e.test_promises import journal_shards


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(r: Result, status: int = 2, *, contains: str = "") -> str:
    """One `error:` line, no traceback, the given status; returns the error line."""
    assert r.exit_code == status, f"exit {r.exit_code}, expected {status}:\n{r.output}"
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.output
    assert "internal error" not in errors[0]
    assert contains in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def sal(tmp_path, fresh_tiny) -> Path:
    p = tmp_path / "s.json"
    cli("synth-saliency", fresh_tiny, "--out", p)
    return p


# --- 1. overwrites -------------------------------------------------------------------------------

def test_synth_refuses_a_non_empty_folder_without_force(tmp_path, fresh_tiny):
    before = source_digest(fresh_tiny)
    assert_error(invoke("synth", "--preset", "tiny-bf16", fresh_tiny), contains="not empty")
    assert source_digest(fresh_tiny) == before
    keep = tmp_path / "other"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    cli("synth", "--preset", "tiny", "--force", keep)
    assert (keep / "notes.txt").read_text() == "mine" and (keep / "model.safetensors.index.json").exists()
    cli("synth", "--preset", "tiny", tmp_path / "empty-or-new")


def test_synth_saliency_never_overwrites_a_file_unasked(tmp_path, fresh_tiny):
    before = source_digest(fresh_tiny)
    assert_error(invoke("synth-saliency", fresh_tiny, "--out", fresh_tiny / "config.json"), contains="--force")
    assert source_digest(fresh_tiny) == before
    out = tmp_path / "s.json"
    out.write_text("old")
    assert_error(invoke("synth-saliency", fresh_tiny, "--out", out), contains="exists")
    assert out.read_text() == "old"
    cli("synth-saliency", fresh_tiny, "--out", out, "--force")
    assert json.loads(out.read_text())["format"] == "moe-rewriter-saliency"
    assert_error(invoke("synth-saliency", fresh_tiny, "--out", tmp_path), contains="is a folder")


def test_plan_out_replaces_a_plan_but_never_another_file(tmp_path, fresh_tiny, sal):
    out = tmp_path / "plan.json"
    cli("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5", "--out", out)
    first = out.read_bytes()
    cli("plan", fresh_tiny, "--saliency", sal, "--keep-n", "2", "--out", out)
    assert out.read_bytes() != first and json.loads(out.read_text())["format"] == "moe-rewriter-plan"
    before = source_digest(fresh_tiny)
    assert_error(invoke("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5", "--out",
                        fresh_tiny / "config.json"), contains="is not a plan file")
    assert_error(invoke("prune", fresh_tiny, tmp_path / "d", "--saliency", sal, "--keep-frac", "0.5",
                        "--plan-out", fresh_tiny / "config.json"), contains="--plan-out")
    assert source_digest(fresh_tiny) == before
    assert not (tmp_path / "d").exists()
    link = tmp_path / "dangling.json"
    link.symlink_to(tmp_path / "nowhere.json")
    line = assert_error(invoke("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5", "--out", link),
                        contains="--out")
    assert f"is a symbolic link to {tmp_path / 'nowhere.json'}, which does not exist" in line
    assert link.is_symlink() and not (tmp_path / "nowhere.json").exists()


def test_two_plans_written_to_one_file_at_once_leave_one_whole_plan(tmp_path, fresh_tiny, sal):
    """Two `plan --out` of the same file at once: each writes under its own temporary name and
    renames it, so the file is one of the two plans, whole, and no temporary file is left."""
    import subprocess

    out = tmp_path / "plan.json"
    runs = [subprocess.Popen([sys.executable, "-m", "rewriter.cli", "plan", str(fresh_tiny), "--saliency", str(sal),
                              keep, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for keep in ("--keep-n=2", "--keep-n=3")]
    outputs = [p.communicate(timeout=300)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    written = json.loads(out.read_text())
    assert written["format"] == "moe-rewriter-plan"
    assert {len(v) for v in written["expert_mapping"].values()} in ({2}, {3})
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith("plan.json")) == ["plan.json"]


def test_plan_out_into_an_unwritable_place(tmp_path, fresh_tiny, sal):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = assert_error(invoke("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5", "--out",
                               blocker / "plan.json"), contains="--out")
    assert "not an existing folder" in line
    assert_error(invoke("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5", "--out", "/proc/plan.json"),
                 contains="cannot write /proc/plan.json")


# --- 2. tracebacks -> one line, exit 2, source untouched, re-run not blocked ---------------------

BAD_PRUNE = [
    (["--buffer-mib", "0"], "--buffer-mib"),
    (["--buffer-mib", "-3"], "--buffer-mib"),
    (["--max-shard-size", "0"], "--max-shard-size"),
    (["--max-shard-size", "-5MB"], "--max-shard-size"),
    (["--max-shard-size", "lots"], "--max-shard-size"),
    (["--coverage", "2"], "--coverage"),
    (["--coverage", "0"], "--coverage"),
    (["--top-k", "9"], "exceeds the checkpoint's 8 experts"),
    (["--top-k", "0"], "--top-k"),
    (["--keep-multiple", "0"], "--keep-multiple"),
    (["--dst-options", "[1]"], "--dst-options"),
]


@pytest.mark.parametrize(("extra", "says"), BAD_PRUNE)
def test_bad_values_end_in_one_line_and_do_not_block_a_rerun(tmp_path, fresh_tiny, sal, extra, says):
    before = source_digest(fresh_tiny)
    dst = tmp_path / "dst"
    base = ["prune", fresh_tiny, dst, "--saliency", sal, "--keep-frac", "0.5"]
    assert_error(invoke(*base, *extra), contains=says)
    assert source_digest(fresh_tiny) == before
    cli(*base)
    assert cli("verify", fresh_tiny, dst).strip().endswith("OK")


@pytest.mark.parametrize("layers", ["0", "-2"])
def test_synth_layers_below_one(tmp_path, layers):
    assert_error(invoke("synth", "--preset", "tiny", "--layers", layers, tmp_path / "x"), contains="--layers")
    assert not (tmp_path / "x").exists()
    cli("synth", "--preset", "tiny", "--layers", "1", tmp_path / "x")


def test_plan_layers_not_numbers(fresh_tiny, sal):
    assert_error(invoke("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5", "--layers", "x,1"),
                 contains="comma-separated layer numbers")


def test_import_reap_refuses_files_that_are_not_observer_pickles(tmp_path):
    torch = pytest.importorskip("torch")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_error(invoke("import-reap", text, "--out", tmp_path / "a.json"), contains="not a REAP observer file")
    # A pickle that would run code when unpickled unsafely: it must be refused, and not run.
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({0: {"expert_frequency": Payload()}}, tmp_path / "evil.pt")
    assert_error(invoke("import-reap", tmp_path / "evil.pt", "--out", tmp_path / "b.json"),
                 contains="not a REAP observer file")
    assert not marker.exists() and not (tmp_path / "b.json").exists()
    good = tmp_path / "obs.pt"
    torch.save({0: {"expert_frequency": torch.tensor([3, 1]), "reap": torch.tensor([0.5, 0.25])}}, good)
    cli("import-reap", good, "--out", tmp_path / "c.json")
    assert "fingerprint" not in json.loads((tmp_path / "c.json").read_text())["model"]
    (tmp_path / "d.json").write_text("{}")
    assert_error(invoke("import-reap", good, "--out", tmp_path / "d.json"), contains="--force")


def _interrupt_when(condition, stop: threading.Event) -> threading.Event:
    """Simulate a Ctrl-C once condition() holds; the event returned is set when it was sent."""
    sent = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if condition():
                sent.set()
                _thread.interrupt_main()
                return
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()
    return sent


@pytest.mark.parametrize("command", ["run", "prune", "soft-prune"])
def test_ctrl_c_says_what_was_kept_and_the_same_command_resumes(tmp_path, command):
    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["small"].with_layers(8))
    sal = tmp_path / "s.json"
    cli("synth-saliency", src, "--out", sal)
    policy = ["--saliency", sal, "--keep-frac", "0.5", "--max-shard-size", "8MB"]
    plan = tmp_path / "plan.json"
    cli("plan", src, *policy, "--out", plan)

    def args(dst):
        head = ["run", plan, "--out", dst] if command == "run" else [command, src, dst, *policy]
        return [*head, "--no-zero-copy", "--buffer-mib", "1"]

    ref = tmp_path / "ref"
    cli(*args(ref))
    before = source_digest(src)
    assert_ctrl_c_reaches_python()
    for attempt in range(5):
        dst = tmp_path / f"dst{attempt}"
        stop = threading.Event()
        # Interrupt once the journal vouches for a finished shard: the run is well under way.
        sent = _interrupt_when(lambda d=dst: journal_shards(d) > 0, stop)
        r = invoke(*args(dst))
        stop.set()
        if r.exit_code != 0:
            break
        # A run that ended before its journal showed a shard is tried again; one that ended well
        # after a Ctrl-C was sent lost it (a KeyboardInterrupt raised in a finalizer is only reported).
        assert not sent.is_set(), f"a Ctrl-C was sent mid-run but {command} finished with exit 0:\n{r.output}"
    else:
        pytest.fail(f"each of 5 runs of {command} ended before its journal showed a finished shard, "
                    "so no Ctrl-C was sent")
    line = assert_error(r, 130, contains="interrupted")
    assert f"kept in {dst}" in line and "run the same command again to resume" in line
    assert not (dst / "model.safetensors.index.json").exists()
    out = cli(*args(dst))
    assert "resumed" in out and "(0 resumed)" not in out
    assert tree_digest(dst) == tree_digest(ref)
    assert source_digest(src) == before


@pytest.mark.slow
def test_ctrl_c_in_a_real_process_exits_130(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "big"
    # A shell may start background jobs with SIGINT ignored; a user's terminal does not.
    p = subprocess.Popen([sys.executable, "-m", "rewriter.cli", "synth", "--preset", "small", "--layers", "12",
                          str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Freeze the process while it is writing a shard (a .tmp file exists while it is stopped), so
    # the interrupt lands in the middle of the work however slow or loaded the machine is.
    deadline = time.monotonic() + 60
    while True:
        assert p.poll() is None and time.monotonic() < deadline, "synth ended before it could be interrupted"
        if any(out.glob("*.tmp")):
            os.kill(p.pid, signal.SIGSTOP)
            if any(out.glob("*.tmp")):
                break
            os.kill(p.pid, signal.SIGCONT)
        time.sleep(0.005)
    finished = [f for f in out.iterdir() if not f.name.endswith(".tmp")]
    os.kill(p.pid, signal.SIGINT)
    os.kill(p.pid, signal.SIGCONT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted; ")
    # Files finished before the interrupt make OUT a partial checkpoint, which only --force writes
    # into again; with none, the same command runs again as it is.
    assert ("--force" in stderr) == bool(finished), (finished, stderr)
    assert bool(finished) or "holds no finished file yet; run the same command again" in stderr, stderr
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("*.tmp")), "the shard being written when interrupted is removed"
    shutil.rmtree(out, ignore_errors=True)


# --- 3. misleading messages, exit statuses, JSON errors ------------------------------------------

def test_layer_options_are_named_as_typed(fresh_tiny, sal):
    line = assert_error(invoke("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5", "--layers", "7"))
    assert "--layers" in line and "7: not an MoE layer" in line and "--layer " not in line
    line = assert_error(invoke("dry-run", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5", "--layer", "7"))
    assert "--layer:" in line or "--layer " in line


def test_top_k_above_the_expert_count(fresh_tiny, sal):
    line = assert_error(invoke("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5", "--top-k", "9"))
    assert "--top-k 9 exceeds the checkpoint's 8 experts" in line and "keep at least 9" not in line


def test_duplicate_keep_list_ids_are_named(tmp_path, fresh_tiny):
    k = tmp_path / "k.json"
    k.write_text(json.dumps({"0": [1, 3, 3, 5, 5], "1": [0, 1, 2, 3]}))
    line = assert_error(invoke("plan", fresh_tiny, "--keep-list", k))
    assert "layer 0" in line and "[3, 5]" in line


def test_verify_statuses_tell_mismatch_from_cannot_verify(tmp_path, fresh_tiny, sal):
    dst = tmp_path / "dst"
    cli("prune", fresh_tiny, dst, "--saliency", sal, "--keep-frac", "0.5")
    assert invoke("verify", fresh_tiny, dst).exit_code == 0
    shard = sorted(dst.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = invoke("verify", fresh_tiny, dst)
    assert r.exit_code == 1 and "mismatch:" in r.output and "FAILED" in r.output
    assert_error(invoke("verify", tmp_path / "nothing-here"), 2)
    assert_error(invoke("verify", fresh_tiny), 2, contains="not written by this tool")
    assert_error(invoke("verify", "a", "b", "c"), 2)


@pytest.mark.parametrize("args", [
    ["plan", "{src}", "--saliency", "{sal}", "--keep-frac", "3", "--json"],
    ["plan", "{src}", "--saliency", "{sal}", "--keep-frac", "0.5", "--buffer-mib", "0", "--json"],
    ["prune", "{src}", "{tmp}/d", "--saliency", "{tmp}/missing.json", "--keep-frac", "0.5", "--json"],
    ["run", "{tmp}/missing-plan.json", "--out", "{tmp}/d", "--json"],
    ["verify", "{tmp}/nothing", "--json"],
    ["dry-run", "{src}", "--layer", "9", "--saliency", "{sal}", "--keep-frac", "0.5", "--json"],
    ["inspect", "{tmp}/nothing", "--json"],
    ["plan", "{src}", "--no-such-option", "--json"],
])
def test_errors_under_json_are_json_on_stdout(tmp_path, fresh_tiny, sal, args):
    filled = [a.format(src=fresh_tiny, sal=sal, tmp=tmp_path) for a in args]
    r = invoke(*filled)
    assert r.exit_code == 2
    doc = json.loads(r.stdout)
    assert set(doc) == {"error", "exit_status"} and doc["exit_status"] == 2 and doc["error"]
    assert "Traceback" not in r.output


def test_every_command_documents_exit_statuses_and_every_option_has_help():
    for name, cmd in main.commands.items():
        assert EXIT_STATUS_HELP in (cmd.epilog or ""), name
        for param in cmd.params:
            if param.param_type_name == "option":
                assert param.help, f"{name} {param.opts} has no help text"
        assert "Exit status: 0" in invoke(name, "--help").output.replace("\n", " ")
    assert "Exit status" in invoke("--help").output


def test_readme_documents_the_exit_statuses():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Exit statuses", 1)[1].split("\n#", 1)[0]
    for status in ("`0`", "`1`", "`2`", "`3`", "`75`", "`130`"):
        assert status in section
    assert '{"error"' in section


def test_plain_rewriter_shows_help_and_exits_0():
    r = invoke()
    assert r.exit_code == 0 and r.output.startswith("Usage:")
    assert not any(line.startswith("error:") for line in r.output.splitlines())


@pytest.mark.slow
def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    import fcntl
    import os
    import subprocess
    import sys

    src = tmp_path / "120b"
    cli("synth", "--preset", "120b", "--sparse", src)
    cli("synth-saliency", src, "--out", tmp_path / "s.json")
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: the ~40 KB of JSON cannot fit
    p = subprocess.Popen([sys.executable, "-m", "rewriter.cli", "plan", str(src), "--saliency", str(tmp_path / "s.json"),
                          "--keep-frac", "0.5", "--json"], stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        assert reader.readline().strip() == "{"
    stderr = p.communicate(timeout=60)[1]
    assert p.returncode == 0 and stderr == ""


def test_an_unexpected_exception_is_reported_as_a_bug_with_status_3():
    from rewriter.cli.errors import EXIT_BUG, _describe_error

    message, status = _describe_error(ZeroDivisionError("division by zero"))
    assert status == EXIT_BUG == 3
    assert message.startswith("internal error (ZeroDivisionError: division by zero)") and "rewriter -vv" in message


def test_python_dash_m_knows_every_command():
    """`python -m rewriter.cli` (how the CLI runs where no console script is installed) registers
    every command before it parses the arguments."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "rewriter.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    commands = r.stdout.split("Commands:", 1)[1].split("\n\n", 1)[0]
    listed = {line.split()[0] for line in commands.splitlines() if line.strip()}
    assert listed == set(main.commands), sorted(set(main.commands) - listed)


@pytest.mark.parametrize("url, says", [
    ("ftp://nowhere.invalid/ckpt", "cannot connect to the store"),
    ("gs://bucket/ckpt", "needs a package that is not installed"),
    ("nosuch://x/ckpt", "not a storage URL this tool can open"),
])
def test_a_store_that_cannot_be_opened_is_named(url, says):
    for args in (("inspect", url), ("check", url)):
        line = assert_error(invoke(*args), 2, contains=says)
        assert url in line and "internal error" not in line
