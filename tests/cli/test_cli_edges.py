"""The edges of every command: files that are not what they should be, option bounds, pipes that
close, storage that cannot be reached, interrupts at any moment. Each ends in one `error:` line
and a documented exit status (or, for a closed pipe, the documented quiet end)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cli.test_cli_errors import assert_error, invoke
from tests.conftest import assert_ctrl_c_reaches_python, cli


@pytest.fixture
def made(tmp_path, fresh_tiny) -> dict[str, Path]:
    """A source, its saliency, a plan and the run's output."""
    sal, plan, out = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "out"
    cli("synth-saliency", fresh_tiny, "--out", sal)
    cli("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5", "--out", plan)
    cli("run", plan, "--out", out, "--quiet")
    return {"src": fresh_tiny, "sal": sal, "plan": plan, "out": out}


# --- JSON input that is binary, not UTF-8, or not an object --------------------------------------

def _binary_files(tmp_path: Path, src: Path) -> list[Path]:
    rnd = tmp_path / "bin.dat"
    rnd.write_bytes(bytes(range(256)) * 8)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"domain": "caf\xe9"}'.encode("latin-1"))
    return [sorted(src.glob("*.safetensors"))[0], rnd, latin1]


def test_binary_or_non_utf8_json_input_is_named_by_every_command(tmp_path, made):
    for f in _binary_files(tmp_path, made["src"]):
        line = assert_error(invoke("run", f, "--out", tmp_path / "x"), contains=f"{f}: not UTF-8 JSON")
        assert "not a plan" in line and "rewriter plan" in line
        for opt in ("--saliency", "--keep-list"):
            line = assert_error(invoke("plan", made["src"], opt, f, "--keep-frac", "0.5"),
                                contains=f"{f}: not UTF-8 JSON")
            assert "not a saliency file or keep list" in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_binary_checkpoint_json_is_named(tmp_path, fresh_tiny, name):
    (fresh_tiny / name).write_bytes(b"\x80\x81{}")
    for args in (["check", fresh_tiny], ["inspect", fresh_tiny], ["synth-saliency", fresh_tiny, "--out", tmp_path / "s"]):
        assert_error(invoke(*args), contains=f"{fresh_tiny / name}: not UTF-8 JSON (byte 0x80 at offset 0)")


def test_binary_pruning_json_is_named_by_verify_card_and_run(tmp_path, made):
    out = made["out"]
    (out / "pruning.json").write_bytes(bytes(range(128, 256)))
    for args in (["verify", out], ["verify", made["src"], out], ["card", out]):
        line = assert_error(invoke(*args), contains=f"{out / 'pruning.json'}: not UTF-8 JSON")
        assert "--force" in line
    # A destination whose state files are binary is still refused or resumed, never a crash.
    r = invoke("run", made["plan"], "--out", out, "--quiet")
    assert r.exit_code in (0, 2) and "internal error" not in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("doc", ["[1]", '"config"', "3", "null", "true"])
def test_config_that_is_not_an_object_is_refused_by_every_command(tmp_path, fresh_tiny, doc):
    (fresh_tiny / "config.json").write_text(doc)
    sal = tmp_path / "s.json"
    for args in (["check", fresh_tiny], ["inspect", fresh_tiny], ["synth-saliency", fresh_tiny, "--out", sal],
                 ["plan", fresh_tiny, "--keep-list", tmp_path / "k.json"]):
        (tmp_path / "k.json").write_text('{"0": [0, 1], "1": [0, 1]}')
        line = assert_error(invoke(*args), contains=f"{fresh_tiny / 'config.json'}: expected a JSON object")
        assert "restore it" in line
    assert not sal.exists()


@pytest.mark.parametrize("doc, says", [
    ("[1, 2]", "expected a JSON object ({...}), found a JSON array"),
    ('"x"', "found a JSON string"),
    ('{"weight_map": [1]}', "expected a non-empty 'weight_map' object"),
    ('{"weight_map": {"model.embed_tokens.weight": 5}}', "Invalid shard filename 5"),
    ('{"weight_map": {"model.embed_tokens.weight": null}}', "must be a shard file name"),
])
def test_index_that_is_not_an_object_of_strings_is_refused(fresh_tiny, doc, says):
    (fresh_tiny / "model.safetensors.index.json").write_text(doc)
    for cmd in ("check", "inspect"):
        assert_error(invoke(cmd, fresh_tiny), contains=says)


# --- --buffer-mib bounds ----------------------------------------------------------------------------

def _buffer_commands(m: dict[str, Path], tmp: Path) -> list[list[object]]:
    policy = ["--saliency", m["sal"], "--keep-frac", "0.5"]
    return [["run", m["plan"], "--out", tmp / "d1"], ["prune", m["src"], tmp / "d2", *policy],
            ["soft-prune", m["src"], tmp / "d3", *policy], ["plan", m["src"], *policy],
            ["verify", m["out"]], ["dry-run", m["src"], "--layer", "0", *policy]]


@pytest.mark.parametrize("value, says", [("999999999", "999999999 MiB is more than the 1024 MiB allowed"),
                                         ("1025", "more than the 1024 MiB allowed"),
                                         ("0", "0 is not a positive number of MiB"), ("-3", "not a positive")])
def test_buffer_mib_is_bounded_on_every_command(tmp_path, made, value, says):
    for args in _buffer_commands(made, tmp_path):
        line = assert_error(invoke(*args, "--buffer-mib", value), contains=says)
        assert "--buffer-mib" in line
    assert not any((tmp_path / d).exists() for d in ("d1", "d2", "d3"))


def test_out_of_memory_is_an_error_not_a_bug(tmp_path, made):
    import resource
    import subprocess
    import sys

    def small_address_space() -> None:  # room for Python and the tool, not for a 1 GiB buffer
        resource.setrlimit(resource.RLIMIT_AS, (900 << 20, 900 << 20))

    # Buffered: the zero-copy path holds no buffer of --buffer-mib.
    args = [sys.executable, "-m", "rewriter.cli", "run", str(made["plan"]), "--out", str(tmp_path / "d"), "--quiet",
            "--no-zero-copy"]
    big = subprocess.run([*args, "--buffer-mib", "1024"], capture_output=True, text=True, timeout=120,
                         preexec_fn=small_address_space)
    assert big.returncode == 2, big.stderr
    assert big.stderr.startswith("error: out of memory") and "--buffer-mib" in big.stderr
    assert "Traceback" not in big.stderr and len(big.stderr.splitlines()) == 1
    small = subprocess.run([*args, "--buffer-mib", "16"], capture_output=True, text=True, timeout=120,
                           preexec_fn=small_address_space)
    assert small.returncode == 0, small.stderr  # the same command with a sane buffer finishes


# --- a reader that stops early (`| head`) -------------------------------------------------------------

def _piped(args: list[object], read_lines: int, linger: float = 0.0) -> tuple[int, str]:
    """Run the CLI with stdout into a real pipe whose reader closes it after ``read_lines`` lines
    (0: before the command writes anything) and ``linger`` seconds; the exit status and stderr."""
    import os
    import subprocess
    import sys
    import time

    read_end, write_end = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "rewriter.cli", *map(str, args)], stdout=write_end,
                         stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        for _ in range(read_lines):
            reader.readline()
        time.sleep(linger)
    return p.wait(timeout=120), p.stderr.read() if p.stderr else ""


@pytest.mark.slow
def test_a_closed_stdout_never_changes_the_exit_status(tmp_path):
    big = tmp_path / "120b"
    cli("synth", "--preset", "120b", "--sparse", big)
    cli("synth-saliency", big, "--out", tmp_path / "s.json")
    failing = tmp_path / "failing"
    cli("synth", "--preset", "tiny", failing)
    config = json.loads((failing / "config.json").read_text())
    (failing / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 99}))
    plan = ["plan", big, "--saliency", tmp_path / "s.json", "--keep-frac", "0.5"]
    cases = [(["check", big], 0), (["check", failing], 1), (plan, 0), ([*plan, "--json"], 0),
             (["inspect", big, "--json"], 0)]
    seen = []
    for i in range(8):  # the reader leaves at different moments: before, during, after the output
        for args, status in cases:
            got, stderr = _piped(args, read_lines=i % 3, linger=0.05 * (i % 4))
            seen.append((args[0], got))
            assert got == status, f"{args[0]}: exit {got}, expected {status} (reader left after {i % 3} lines):\n{stderr}"
            assert stderr == "" or (status == 1 and "error" not in stderr), stderr
    assert len(seen) == 8 * len(cases)


# --- Ctrl-C however early -------------------------------------------------------------------------

# What pip writes as the `rewriter` console script (pyproject [project.scripts]), with an audit
# hook that says "ready" when the entry point starts importing the CLI: from there on no moment
# may show a traceback. (Before it run the interpreter's start-up and the two lines of the
# script, which no program can guard.)
CONSOLE_SCRIPT = """import re
import sys
def ready(event, args):
    if event == "import" and args[0] == "rewriter.cli":
        sys.stderr.write("ready\\n"); sys.stderr.flush()
sys.addaudithook(ready)
from rewriter.entry import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(main())
"""


def test_the_console_script_is_the_entry_point():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["rewriter"] == "rewriter.entry:main"


def _interrupted_at(script: Path, args: list[object], delay: float) -> tuple[int | None, str, str]:
    """Start the console script, interrupt it ``delay`` s after it is ready; status, stdout, stderr
    (status None: it had ended before the interrupt)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stderr is not None and p.stderr.readline() == "ready\n"
    time.sleep(delay)
    os.kill(p.pid, signal.SIGSTOP)  # where it is now is where the interrupt lands
    finished = p.poll() is not None
    if not finished:
        os.kill(p.pid, signal.SIGINT)
        os.kill(p.pid, signal.SIGCONT)
    stdout, stderr = p.communicate(timeout=120)
    return (None if finished else p.returncode), stdout, stderr


@pytest.mark.slow
@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_at_any_early_moment_is_one_line_and_130(tmp_path, as_json):
    script = tmp_path / "rewriter"
    script.write_text(CONSOLE_SCRIPT)
    src, sal = tmp_path / "src", tmp_path / "s.json"
    if as_json:
        cli("synth", "--preset", "small", "--layers", "12", "--quiet", src)
        cli("synth-saliency", src, "--out", sal)
    moments = [0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    for i, delay in enumerate(moments):
        out = tmp_path / f"o{i}"
        args: list[object] = ["synth", "--preset", "small", "--layers", "12", out]
        if as_json:
            args = ["prune", src, out, "--saliency", sal, "--keep-frac", "0.5", "--no-zero-copy", "--json"]
        status, stdout, stderr = _interrupted_at(script, args, delay)
        finished = (out / "model.safetensors.index.json").exists()
        shutil.rmtree(out, ignore_errors=True)
        assert "Traceback" not in stderr, f"at {delay} s:\n{stderr}"
        if finished:  # the work was done before the interrupt came: nothing to interrupt
            assert delay > 0.1, f"a {args[0]} cannot finish {delay} s after it starts"
            continue
        assert status == 130, f"at {delay} s: exit {status}:\n{stderr}"
        if as_json:
            doc = json.loads(stdout)
            assert doc["exit_status"] == 130 and doc["error"].startswith("interrupted"), stdout
            assert not [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        else:
            lines = stderr.strip().splitlines()
            assert lines[-1].startswith("error: interrupted"), f"at {delay} s:\n{stderr}"
            assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:]


SLOW_COST = """import os, sys, time
import planners.cost
real, mark = planners.cost.estimate, sys.argv.pop(1)
def slow(*args, **kwargs):  # the forked child's cost: it says where it is, then waits
    with open(mark, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(300)
    return real(*args, **kwargs)
planners.cost.estimate = slow
from rewriter.entry import main
sys.exit(main())
"""


def test_ctrl_c_while_plan_out_waits_for_its_cost_is_one_line_and_leaves_no_child(tmp_path, tiny, tiny_saliency):
    """`plan --out` costs the plan in a forked child while it writes the file: interrupted
    once the file is written and the child is costing, it says so in one line, exit 130, and
    stops the child."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script, mark, out = tmp_path / "rewriter", tmp_path / "child.pid", tmp_path / "plan.json"
    script.write_text(SLOW_COST)
    p = subprocess.Popen([sys.executable, str(script), str(mark), "plan", str(tiny), "--saliency", str(tiny_saliency),
                          "--keep-frac", "0.5", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    give_up = time.monotonic() + 240  # waits for the two events, however busy the machine
    while not (mark.exists() and mark.read_text() and out.exists()) and p.poll() is None and time.monotonic() < give_up:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    child = int(mark.read_text())
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert json.loads(out.read_text())["format"] == "moe-rewriter-plan"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["child.pid", "plan.json", "rewriter"]


def test_an_interrupted_synth_leaves_no_temporary_and_can_be_run_again(tmp_path, monkeypatch):
    import _thread

    from rewriter.tools import synth

    out = tmp_path / "t"
    real = synth.tensor_chunks

    def interrupted_midway(name, dtype, shape):  # Ctrl-C while the first shard is being written
        yield from real(name, dtype, shape)
        _thread.interrupt_main()

    monkeypatch.setattr(synth, "tensor_chunks", interrupted_midway)
    assert_ctrl_c_reaches_python()
    assert_error(invoke("synth", "--preset", "tiny", out), 130, contains="interrupted")
    monkeypatch.undo()
    assert list(out.iterdir()) == []
    # A folder holding only the temporaries of a killed synth counts as empty.
    (out / "model-00000-of-00002.safetensors.tmp").write_bytes(b"half")
    cli("synth", "--preset", "tiny", out)
    assert not list(out.glob("*.tmp")) and (out / "model.safetensors.index.json").exists()
    assert_error(invoke("synth", "--preset", "tiny", out), contains="not empty")


# --- object storage without credentials, or out of reach ---------------------------------------------

@pytest.mark.s3
@pytest.mark.slow
def test_object_storage_without_credentials_or_out_of_reach_names_url_and_option(s3, made, tmp_path):
    import os
    import subprocess
    import sys

    from bench_io.s3server import free_port

    s3.make_bucket("edges")
    s3.upload_dir(made["src"], "edges/src")
    s3.upload_dir(made["out"], "edges/out")
    plan = json.loads(made["plan"].read_text())
    plan["source"]["url"] = "s3://edges/src"
    remote_plan = tmp_path / "remote-plan.json"
    remote_plan.write_text(json.dumps(plan))
    # The user's environment holds no credentials at all (nor a metadata server to ask).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    no_keys = json.dumps({"client_kwargs": {"endpoint_url": s3.endpoint}})
    closed = json.dumps({**s3.options, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}})
    policy = ["--saliency", made["sal"], "--keep-frac", "0.5"]
    cases = [
        (["plan", "s3://edges/src", *policy, "--storage-options", no_keys], "s3://edges/src", "--storage-options"),
        (["plan", "s3://edges/src", *policy], "s3://edges/src", "--storage-options"),
        (["run", remote_plan, "--out", tmp_path / "d1", "--src-options", no_keys], "s3://edges/src", "--src-options"),
        (["run", made["plan"], "--out", "s3://edges/d2", "--dst-options", no_keys], "s3://edges/d2", "--dst-options"),
        (["prune", made["src"], "s3://edges/d3", *policy], "s3://edges/d3", "--dst-options"),
        (["check", "s3://edges/out"], "s3://edges/out", "--storage-options"),
        (["inspect", "s3://edges/out", "--storage-options", no_keys], "s3://edges/out", "--storage-options"),
        (["card", "s3://edges/out"], "s3://edges/out", "--dst-options"),
        (["verify", "s3://edges/out", "--dst-options", no_keys], "s3://edges/out", "--dst-options"),
        (["verify", "s3://edges/src", made["out"]], "s3://edges/src", "--src-options"),
        (["status", "s3://edges/out", "--dst-options", no_keys], "s3://edges/out", "--dst-options"),
    ]
    for args, url, option in cases:
        r = subprocess.run([sys.executable, "-m", "rewriter", *map(str, args)], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2, f"{args[0]}: exit {r.returncode}:\n{r.stderr}"
        assert r.stderr.startswith(f"error: {url}: no credentials for this object store; pass {option} "), r.stderr
        assert len(r.stderr.splitlines()) == 1 and "AWS_ACCESS_KEY_ID" in r.stderr
    unreachable = [(["plan", "s3://edges/src", *policy, "--storage-options", closed], "--storage-options"),
                   (["run", made["plan"], "--out", "s3://edges/d4", "--dst-options", closed], "--dst-options"),
                   (["check", "s3://edges/out", "--storage-options", closed], "--storage-options"),
                   (["card", "s3://edges/out", "--dst-options", closed], "--dst-options"),
                   (["status", "s3://missing-bucket/x", "--dst-options", closed], "--dst-options")]
    for args, option in unreachable:
        r = subprocess.run([sys.executable, "-m", "rewriter", *map(str, args)], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2, f"{args[0]}: exit {r.returncode}:\n{r.stderr}"
        assert "cannot connect to the object store" in r.stderr and f"pass {option} " in r.stderr, r.stderr
        url = "s3://missing-bucket/x" if args[0] == "status" else "s3://edges/"
        assert r.stderr.startswith(f"error: {url}") and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "d1").exists()


# --- wording: what the messages suggest must work -------------------------------------------------------

def test_the_internal_error_hint_is_a_command_line_that_parses(made, monkeypatch):
    import rewriter.tools.inspect

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(rewriter.tools.inspect, "describe", broken)
    r = invoke("inspect", made["src"])
    assert r.exit_code == 3 and "this is a bug" in r.output
    suggested = r.output.split("`rewriter -vv inspect ...`")
    assert len(suggested) == 2, r.output
    again = invoke("-vv", "inspect", made["src"])  # what the hint says to run
    assert again.exit_code == 3 and "No such option" not in again.output
    assert "ZeroDivisionError" in again.output


@pytest.mark.parametrize("name", ["bin.dat", "s.json"])
def test_a_file_given_as_checkpoint_suggests_its_folder_only_when_that_is_a_checkpoint(tmp_path, made, name):
    f = tmp_path / name
    if not f.exists():
        f.write_bytes(b"\x00" * 64)
    line = assert_error(invoke("plan", f, "--saliency", made["sal"], "--keep-frac", "0.5"), contains="is a file")
    assert f"pass {tmp_path}" not in line and "pass such a folder" in line
    shard = sorted(made["src"].glob("*.safetensors"))[0]
    line = assert_error(invoke("plan", shard, "--saliency", made["sal"], "--keep-frac", "0.5"), contains="is a file")
    assert line.endswith(f"pass {made['src']}")


def test_verify_and_card_name_a_file_given_as_output(tmp_path, made):
    for args in (["verify", made["src"], made["plan"]], ["verify", made["plan"]], ["card", made["plan"]]):
        line = assert_error(invoke(*args), contains=f"{made['plan']} is a file; give the folder")
        assert "pruning.json not found" not in line and "finish the run" not in line
