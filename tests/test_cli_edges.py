"""The edges of every command: files that are not what they should be, option bounds, pipes that
close, storage that cannot be reached, interrupts at any moment. Each ends in one `error:` line
and a documented exit status (or, for a closed pipe, the documented quiet end)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.test_cli_errors import assert_error, invoke


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

    args = [sys.executable, "-m", "rewriter.cli", "run", str(made["plan"]), "--out", str(tmp_path / "d"), "--quiet"]
    big = subprocess.run([*args, "--buffer-mib", "1024"], capture_output=True, text=True, timeout=120,
                         preexec_fn=small_address_space)
    assert big.returncode == 2, big.stderr
    assert big.stderr.startswith("error: out of memory") and "--buffer-mib" in big.stderr
    assert "Traceback" not in big.stderr and len(big.stderr.splitlines()) == 1
    small = subprocess.run([*args, "--buffer-mib", "16"], capture_output=True, text=True, timeout=120,
                           preexec_fn=small_address_space)
    assert small.returncode == 0, small.stderr  # the same command with a sane buffer finishes
