"""What users read: advice that runs, warnings of one shape, counts in words, progress where a
command is long, strict JSON, and refusals that give the real reason."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rewriter.cli import main
from rewriter.cli.errors import EXIT_STATUS_HELP
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.cli.test_cli_output import _on_a_terminal
from tests.conftest import cli


def _error(*args: object, status: int = 2) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == status, r.output
    (line,) = [x for x in r.output.splitlines() if x.startswith("error: ")]
    return line


def _rewriter(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rewriter.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=120, env=env)


def test_run_refuses_a_per_layer_plan_with_advice_that_runs(tmp_path, tiny, tiny_saliency):
    plan = tmp_path / "layers.json"
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--layers", "1", "--out", plan)
    line = _error("run", plan, "--out", tmp_path / "dst")
    advised = line.split("`")[3]
    assert advised == f"rewriter dry-run {plan}"
    probes = json.loads(cli(*advised.split()[1:], "--json"))
    assert [p["layer"] for p in probes] == [1]
    assert "--layer" in _error("dry-run", plan, "--layer", "0")  # the plan holds its layers
    assert "--keep-frac" in _error("dry-run", plan, "--keep-frac", "0.25")
    whole = tmp_path / "whole.json"
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--out", whole)
    assert f"rewriter run {whole} --out DST" in _error("dry-run", whole)
    assert "--layer N" in _error("dry-run", tiny)


def test_dry_run_copy_seconds_lie_within_the_elapsed_seconds(tiny, tiny_saliency):
    probes = json.loads(cli("dry-run", tiny, "--layer", "0", "--layer", "1", "--saliency", tiny_saliency,
                            "--keep-frac", "0.5", "--json"))
    assert probes and all(0 <= p["copy_seconds"] <= p["seconds"] for p in probes), probes


def test_logged_warnings_look_like_the_cli_own(tiny, tmp_path):
    old = tmp_path / "old.json"
    synthetic_saliency(2, 8, 2).save(old)  # no model identity: plan warns through its logger
    p = _rewriter("plan", tiny, "--saliency", old, "--keep-frac", "0.5")
    assert p.returncode == 0, p.stderr
    assert "records no model identity" in p.stderr
    assert all(x.startswith("warning: ") for x in p.stderr.splitlines() if x.strip()), p.stderr
    assert "WARNING" not in p.stderr


def test_prune_json_holds_the_keep_sets_and_mapping_plan_json_has(tmp_path, tiny, tiny_saliency):
    planned = json.loads(cli("plan", tiny, "--saliency", tiny_saliency, "--keep-n", "4", "--json"))
    pruned = json.loads(cli("prune", tiny, tmp_path / "dst", "--saliency", tiny_saliency, "--keep-n", "4", "--json"))
    for key in ("keep", "expert_mapping", "top_k", "loadable_by_transformers"):
        assert pruned[key] == planned[key], key
    assert pruned["keep"]["0"] and len(pruned["keep"]["0"]) == 4


def test_one_output_shard_is_named_model_safetensors(tmp_path, tiny, tiny_saliency):
    from core.checkpoint import Checkpoint

    dst = tmp_path / "dst"
    out = cli("prune", tiny, dst, "--saliency", tiny_saliency, "--keep-n", "4", "--max-shard-size", "1GB")
    assert "1 shard (" in out
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert shards == ["model.safetensors"]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert Checkpoint.open(str(dst)).shards.keys() == {"model.safetensors"}
    assert cli("verify", tiny, dst).strip().endswith("OK")
    several = tmp_path / "several"
    cli("prune", tiny, several, "--saliency", tiny_saliency, "--keep-n", "4", "--max-shard-size", "64KB")
    assert "model.safetensors" not in {p.name for p in several.glob("*.safetensors")}


@pytest.mark.parametrize("layers", ["0", "100000"])
def test_synth_refuses_a_layer_count_out_of_range_at_once(tmp_path, layers):
    line = _error("synth", "--preset", "deepseek-v3", "--sparse", "--layers", layers, tmp_path / "x")
    assert "--layers" in line and f"{layers} is not in the range 1<=x<=1024" in line, line
    assert not (tmp_path / "x").exists()


def test_counts_read_as_words(tmp_path, tiny, tiny_saliency):
    out = cli("synth", "--preset", "tiny", "--layers", "1", tmp_path / "one")
    n = len(list((tmp_path / "one").glob("*.safetensors")))
    assert (f"{n} shards," if n > 1 else "1 shard,") in out, out
    r = CliRunner().invoke(main, ["check", str(tiny), "--ep", "3"])  # one rule warns for 8 experts on 3 ranks
    assert r.exit_code == 1 and "failed, 1 warning -> FAILED" in r.output, r.output
    line = _error("plan", tiny, "--saliency", tiny_saliency, "--keep-n", "1")
    assert "keeping 1 expert per layer" in line
    half = tmp_path / "half.json"
    doc = json.loads(tiny_saliency.read_text())
    doc["layers"] = {"0": doc["layers"]["0"]}
    half.write_text(json.dumps(doc))
    line = _error("plan", tiny, "--saliency", half, "--keep-frac", "0.5")
    assert "saliency covers 1 layer [0]," in line and "layers 1 layers" not in line


def test_keep_multiple_above_the_expert_count_is_named(tiny, tiny_saliency):
    line = _error("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--keep-multiple", "64")
    assert "--keep-multiple 64 exceeds" in line and "0 experts" not in line


def test_zero_top_k_in_the_config_is_blamed_on_the_config(tmp_path, tiny_saliency):
    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["tiny"])
    config = json.loads((src / "config.json").read_text())
    config["num_experts_per_tok"] = 0
    (src / "config.json").write_text(json.dumps(config))
    line = _error("plan", src, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--allow-foreign-saliency")
    assert "--top-k 0" not in line and "config" in line, line


def test_a_hidden_file_in_a_plan_is_refused_as_hidden(tmp_path, tiny, tiny_saliency):
    plan = tmp_path / "plan.json"
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--out", plan)
    doc = json.loads(plan.read_text())
    doc["copy_files"] = [*doc["copy_files"], ".env"]
    doc["copy_file_digests"][".env"] = {"size": 0, "sha256": "0" * 64}
    plan.write_text(json.dumps(doc))
    line = _error("run", plan, "--out", tmp_path / "dst")
    assert "'.env' has a component starting with '.'" in line and "state folder" not in line, line


def test_verify_without_the_recorded_source_says_src_can_be_given(tmp_path, tiny_saliency):
    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["tiny"])
    cli("prune", src, tmp_path / "dst", "--saliency", tiny_saliency, "--keep-n", "4")
    moved = tmp_path / "moved"
    src.rename(moved)
    line = _error("verify", tmp_path / "dst")
    assert str(src) not in line and "rewriter verify SRC DST" in line, line
    assert cli("verify", moved, tmp_path / "dst").strip().endswith("OK")


def test_verify_draws_progress_on_a_terminal_and_quiet_silences_it(tmp_path, tiny, tiny_saliency):
    dst = tmp_path / "dst"
    cli("prune", tiny, dst, "--saliency", tiny_saliency, "--keep-n", "4", "--quiet")
    status, drawn = _on_a_terminal("verify", tiny, dst)
    assert status == 0 and "\rverify [" in drawn and "100.0%" in drawn
    status, drawn = _on_a_terminal("verify", tiny, dst, "--quiet")
    assert status == 0 and drawn == ""
    r = CliRunner().invoke(main, ["verify", str(tiny), str(dst), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True


def test_interrupted_synth_before_any_file_says_nothing_was_written(tmp_path, monkeypatch):
    import rewriter.tools.synth

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, before the first file is written
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(rewriter.tools.synth, "write_checkpoint", interrupted)
    r = CliRunner().invoke(main, ["synth", "--preset", "tiny", str(tmp_path / "out")])
    assert r.exit_code == 130
    assert "holds no finished file yet" in r.output and "partial checkpoint" not in r.output, r.output


def test_a_ctrl_c_after_the_command_ended_leaves_its_status(tmp_path, tiny):
    """A SIGINT while the interpreter shuts down (here: from an exit handler) is ignored."""
    code = ("import atexit, os, signal, sys\n"
            "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
            f"sys.argv = ['rewriter', 'inspect', {str(tiny)!r}]\n"
            "from rewriter.entry import main\n"
            "main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert p.returncode == 0, (p.returncode, p.stderr)
    assert "KeyboardInterrupt" not in p.stderr and "shards:" in p.stdout


def test_main_help_lists_every_command_that_exits_1():
    assert "status: the job or the run failed" in EXIT_STATUS_HELP and "check: a rule failed" in EXIT_STATUS_HELP
    assert "status: the job or the run failed" in " ".join(cli("--help").split())


def test_import_reap_refuses_an_observer_of_another_geometry(tmp_path, fresh_tiny):
    torch = pytest.importorskip("torch")
    obs = tmp_path / "obs.pt"
    torch.save({layer: {"expert_frequency": torch.arange(32) + 1, "reap": torch.ones(32)} for layer in range(4)}, obs)
    line = _error("import-reap", obs, "--out", tmp_path / "s.json", "--model", fresh_tiny)
    assert str(obs) in line and "4 layers" in line and "x 32 experts" in line and "x 8 experts" in line, line
    assert not (tmp_path / "s.json").exists()


def test_import_reap_never_advises_turning_the_pickle_safety_off(tmp_path):
    torch = pytest.importorskip("torch")

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({0: {"expert_frequency": Payload()}}, tmp_path / "evil.pt")
    line = _error("import-reap", tmp_path / "evil.pt", "--out", tmp_path / "s.json")
    assert "weights_only" not in line and "refused" in line, line


def test_empty_data_file_is_called_empty(tmp_path, tiny):
    pytest.importorskip("torch")
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    line = _error("profile", tiny, "--data", data, "--out", tmp_path / "s.json", "--seq-len", "32", "--device", "cpu",
                  "--quiet")
    assert "holds no text" in line and "token(s)" not in line, line


def test_quality_results_are_strict_json(tmp_path):
    def strict(text: str) -> object:
        def refuse(name: str) -> object:
            raise ValueError(f"{name} is not JSON")
        return json.loads(text, parse_constant=refuse)

    committed = Path(__file__).parents[2] / "quality" / "results" / "quality-full.json"
    strict(committed.read_text())
    shutil.copy(committed, tmp_path / "r.json")
    p = subprocess.run([sys.executable, "-m", "quality.report", str(tmp_path / "r.json"), "--results",
                        str(tmp_path / "out")], capture_output=True, text=True, check=False, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = strict((tmp_path / "out" / "r.json").read_text())
    assert any(v is None for c in doc["cells"] for m in c["metrics"].values() for v in m)  # one seed: no interval


def test_eval_states_its_gates_in_words(tmp_path):
    pytest.importorskip("torch")
    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["tiny"])
    data = tmp_path / "words.jsonl"
    data.write_text("".join(json.dumps({"text": f"the {i} of {i + 1} and {i + 2}\n" * 4}) + "\n" for i in range(40)))
    out = cli("eval", src, "--data", data, "--seq-len", "32", "--blocks", "2", "--device", "cpu", "--compare", src)
    (line,) = [x for x in out.splitlines() if x.startswith("near-lossless:")]
    assert "{" not in line and "Δppl <= max(0.25, 0.05 x base ppl)" in line and "JSD <= 0.02" in line, line
