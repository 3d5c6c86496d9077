"""What users expect to see: kept counts, keep sets in JSON, notes on full copies and
non-uniform output, saliency identity checks, and progress fit for terminals and logs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from core.checkpoint import Checkpoint
from planners.saliency import load_saliency, model_identity
from rewriter.cli import main
from rewriter.tools.progress import ByteProgress
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.conftest import cli, source_digest


@pytest.fixture
def sal(tmp_path, fresh_tiny) -> Path:
    p = tmp_path / "s.json"
    cli("synth-saliency", fresh_tiny, "--out", p)
    return p


# --- what plan and prune keep --------------------------------------------------------------------

def test_plan_and_prune_print_kept_counts_and_verbose_ids(tmp_path, fresh_tiny, sal):
    out = cli("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5")
    assert "kept:       4 of 8 experts in each of 2 MoE layers (0..1), routing top-k 2" in out
    assert "layer 0: [" not in out
    out = cli("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5", "--verbose")
    doc = json.loads(cli("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.5", "--json"))
    for layer, ids in doc["keep"].items():
        assert f"layer {layer}: {ids}" in out
    out = cli("prune", fresh_tiny, tmp_path / "d", "--saliency", sal, "--keep-n", "3", "--verbose")
    assert "kept:       3 of 8 experts in each of 2 MoE layers" in out and "layer 1: [" in out
    out = cli("soft-prune", fresh_tiny, tmp_path / "soft", "--saliency", sal, "--keep-n", "3")
    assert "3 of 8 experts" in out and "full copy" not in out


def test_plan_json_without_out_has_keep_sets_and_mapping(fresh_tiny, sal):
    doc = json.loads(cli("plan", fresh_tiny, "--saliency", sal, "--keep-n", "4", "--json"))
    assert doc["plan"] is None
    assert set(doc["keep"]) == {"0", "1"} and all(len(v) == 4 for v in doc["keep"].values())
    assert doc["expert_mapping"] == doc["keep"]
    assert doc["num_experts"] == 8 and doc["top_k"] == 2 and doc["loadable_by_transformers"] is True
    assert doc["cost"]["bytes_written"] > 0


def test_keeping_every_expert_says_it_is_a_full_copy(tmp_path, fresh_tiny, sal):
    assert "full copy of the source" in cli("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "1")
    assert "full copy of the source" in cli("prune", fresh_tiny, tmp_path / "d", "--saliency", sal,
                                            "--keep-frac", "1")
    assert "full copy" not in cli("plan", fresh_tiny, "--saliency", sal, "--keep-frac", "0.75")


def test_nonuniform_output_says_transformers_cannot_load_it(tmp_path, fresh_tiny, sal):
    out = cli("prune", fresh_tiny, tmp_path / "d", "--saliency", sal, "--budget", "9", "--allow-nonuniform")
    assert "stock transformers cannot load" in out
    doc = json.loads(cli("prune", fresh_tiny, tmp_path / "j", "--saliency", sal, "--budget", "9",
                         "--allow-nonuniform", "--json"))
    assert doc["loadable_by_transformers"] is False
    assert "cannot load" not in cli("prune", fresh_tiny, tmp_path / "u", "--saliency", sal, "--keep-n", "4")


# --- saliency identity ---------------------------------------------------------------------------

def test_saliency_records_identity_and_foreign_files_are_refused(tmp_path, fresh_tiny, sal):
    recorded = load_saliency(str(sal)).model
    assert recorded == model_identity(Checkpoint.open(str(fresh_tiny)))
    assert recorded["family"] == "gpt_oss" and len(recorded["fingerprint"]) == 64
    # Same family and geometry, other dtypes (bf16 experts): another model.
    other = tmp_path / "bf16"
    write_checkpoint(other, PRESETS["tiny-bf16"])
    foreign = tmp_path / "foreign.json"
    cli("synth-saliency", other, "--out", foreign)
    before = source_digest(fresh_tiny)
    r = CliRunner().invoke(main, ["plan", str(fresh_tiny), "--saliency", str(foreign), "--keep-frac", "0.5"])
    assert r.exit_code == 2 and "profiled on another model" in r.output and "--allow-foreign-saliency" in r.output
    r = CliRunner().invoke(main, ["prune", str(fresh_tiny), str(tmp_path / "d"), "--saliency", str(foreign),
                                  "--keep-frac", "0.5"])
    assert r.exit_code == 2 and not (tmp_path / "d").exists()
    r = CliRunner().invoke(main, ["dry-run", str(fresh_tiny), "--layer", "0", "--saliency", str(foreign),
                                  "--keep-frac", "0.5"])
    assert r.exit_code == 2 and "profiled on another model" in r.output
    cli("plan", fresh_tiny, "--saliency", foreign, "--keep-frac", "0.5", "--allow-foreign-saliency")
    assert source_digest(fresh_tiny) == before
    # Another geometry names both models.
    three = tmp_path / "three"
    write_checkpoint(three, PRESETS["tiny"].with_layers(3))
    s3 = tmp_path / "three.json"
    cli("synth-saliency", three, "--out", s3)
    doc = json.loads(s3.read_text())
    doc["layers"] = {k: v for k, v in doc["layers"].items() if k in ("0", "1")}
    s3.write_text(json.dumps(doc))
    r = CliRunner().invoke(main, ["plan", str(fresh_tiny), "--saliency", str(s3), "--keep-frac", "0.5"])
    assert "3 MoE layers" in r.output and "2 MoE layers" in r.output


def test_saliency_without_identity_is_accepted_with_a_warning(tmp_path, fresh_tiny):
    old = tmp_path / "old.json"
    synthetic_saliency(2, 8, 2, domain="code").save(old)
    p = subprocess.run([sys.executable, "-m", "rewriter.cli", "plan", str(fresh_tiny), "--saliency", str(old),
                        "--keep-frac", "0.5"], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert "records no model identity" in p.stderr and "kept:" in p.stdout


@pytest.mark.parametrize(("family", "layers"), [("mixtral", [0, 1, 2]), ("deepseek_v3", [1, 2])])
def test_synth_saliency_writes_the_family_and_moe_layers(tmp_path, family, layers):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.e2e.test_families import _build

    _build(family, tmp_path / family)
    out = cli("synth-saliency", tmp_path / family, "--out", tmp_path / "s.json")
    assert f"family {family}" in out
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["model"]["family"] == family and doc["model"]["num_experts"] == 8 and doc["model"]["top_k"] == 2
    assert sorted(int(k) for k in doc["layers"]) == layers  # DeepSeek's first layer is dense
    cli("plan", tmp_path / family, "--saliency", tmp_path / "s.json", "--keep-n", "4")


# --- progress ------------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_and_ends_at_100():
    term = Terminal()
    bar = ByteProgress(stream=term)
    bar.start(1000)
    time.sleep(0.25)  # a terminal redraws at most five times a second
    bar(400)
    bar(576)  # byte callbacks count tensor data; headers make up the rest
    bar.close()
    text = term.getvalue()
    assert text.startswith("\r") and " 40.0%" in text and "ETA" in text
    assert text.rstrip("\n").rsplit("\r", 1)[1].split("]")[1].lstrip().startswith("100.0%")
    assert text.endswith("\n")


def test_progress_in_a_log_is_plain_lines_every_few_seconds():
    log = io.StringIO()
    bar = ByteProgress(stream=log, log_every=0.0)
    bar.start(2000)
    for _ in range(4):
        bar(500)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 5
    assert lines[0].startswith("rewrite: 25.0%") and lines[-1].startswith("rewrite: 100.0%")
    quiet = io.StringIO()
    short = ByteProgress(stream=quiet)  # a run shorter than log_every prints nothing
    short.start(10)
    short(10)
    short.close()
    assert quiet.getvalue() == ""


def test_nothing_to_write_draws_no_bar():
    for stream in (Terminal(), io.StringIO()):
        bar = ByteProgress(stream=stream, log_every=0.0)
        bar.start(0)
        bar.close()
        assert stream.getvalue() == ""


def test_a_complete_destination_prints_no_zero_byte_bar(tmp_path, fresh_tiny, sal):
    plan = tmp_path / "plan.json"
    cli("prune", fresh_tiny, tmp_path / "d", "--saliency", sal, "--keep-n", "4", "--plan-out", plan)
    p = subprocess.run([sys.executable, "-m", "rewriter.cli", "run", str(plan), "--out", str(tmp_path / "d")],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0 and "already holds the complete output" in p.stdout
    assert p.stderr == ""


def test_synth_reports_progress_of_every_tensor_byte(tmp_path):
    seen: list[int] = []
    index = write_checkpoint(tmp_path / "c", PRESETS["tiny"], progress=seen.append)
    assert sum(seen) == index["metadata"]["total_size"] and len(seen) > 1
    log = io.StringIO()
    bar = ByteProgress(label="synth", stream=log, log_every=0.0)
    bar.start(index["metadata"]["total_size"])
    write_checkpoint(tmp_path / "d", PRESETS["tiny"], progress=bar)
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("synth: 100.0%")


def test_import_reap_with_model_records_its_identity(tmp_path, fresh_tiny):
    torch = pytest.importorskip("torch")
    obs = tmp_path / "obs.pt"
    torch.save({layer: {"expert_frequency": torch.arange(8) + 1, "weighted_ean_sum": torch.linspace(1, 4, 8)}
                for layer in (0, 1)}, obs)
    cli("import-reap", obs, "--out", tmp_path / "s.json", "--model", fresh_tiny)
    assert load_saliency(str(tmp_path / "s.json")).model == model_identity(Checkpoint.open(str(fresh_tiny)))
    p = subprocess.run([sys.executable, "-m", "rewriter.cli", "plan", str(fresh_tiny), "--saliency",
                        str(tmp_path / "s.json"), "--rank", "freq", "--keep-n", "4", "--verbose"],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0 and p.stderr == ""
    assert "layer 0: [4, 5, 6, 7]" in p.stdout  # the four most frequent


def _on_a_terminal(*args: object) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; returns the exit status and what it drew."""
    import os
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "rewriter.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                         stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal's other end closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return p.wait(timeout=60), b"".join(chunks).decode()


def test_bars_on_a_real_terminal_end_at_100_and_quiet_silences_them(tmp_path, fresh_tiny, sal):
    plan = tmp_path / "plan.json"
    cli("plan", fresh_tiny, "--saliency", sal, "--keep-n", "4", "--out", plan)
    status, drawn = _on_a_terminal("run", plan, "--out", tmp_path / "d")
    assert status == 0 and "\rrewrite [" in drawn
    assert drawn.rstrip().rsplit("\r", 1)[1].split("]")[1].lstrip().startswith("100.0%")
    status, drawn = _on_a_terminal("run", plan, "--out", tmp_path / "q", "--quiet")
    assert status == 0 and drawn == ""
    status, drawn = _on_a_terminal("run", plan, "--out", tmp_path / "d")  # complete: nothing to draw
    assert status == 0 and drawn == ""
    status, drawn = _on_a_terminal("synth", "--preset", "tiny", tmp_path / "synth")
    assert status == 0 and "\rsynth [" in drawn and "100.0%" in drawn
