"""Layouts, saliency input, the plan and its cost."""

from __future__ import annotations

import json
import math

import pytest

from core.checkpoint import Checkpoint
from core.errors import PlanError, SaliencyError
from core.layouts import GPT_OSS
from planners.build import assign_shards, build_plan
from planners.cost import estimate
from planners.keep_list import load_keep_list
from planners.plan import Plan
from planners.policies import Domain, KeepPolicy
from planners.saliency import load_saliency
from planners.selection import select_keep
from planners.source_check import check_source
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.conftest import cli


def _plan(ckpt: Checkpoint, n: int = 4, **kw) -> Plan:
    lay = ckpt.layout
    layers = sorted(lay.moe_layers(ckpt))
    sal = synthetic_saliency(len(layers), lay.num_experts(ckpt.config), lay.top_k(ckpt.config), seed=3)
    decision = select_keep([Domain(sal)], layers, lay.num_experts(ckpt.config), lay.top_k(ckpt.config),
                           KeepPolicy(keep_n=n))
    return build_plan(ckpt, decision, **kw)


@pytest.mark.parametrize("preset,expert_tensors", [
    ("tiny", {"gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias", "down_proj_blocks",
              "down_proj_scales", "down_proj_bias", "router.weight", "router.bias"}),
    ("tiny-bf16", {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias", "router.weight", "router.bias"}),
])
def test_layouts_classify_mxfp4_and_bf16(tmp_path, preset, expert_tensors):
    write_checkpoint(tmp_path, PRESETS[preset])
    c = Checkpoint.open(str(tmp_path))
    moe = GPT_OSS.moe_layers(c)
    assert sorted(moe) == [0, 1]
    names = {t.name.split("experts.")[-1].split("mlp.")[-1] for t in moe[0].tensors}
    assert names == expert_tensors
    assert GPT_OSS.classify("model.layers.0.self_attn.q_proj.weight") is None
    assert GPT_OSS.classify("model.layers.0.mlp.router.weight").role == "router"
    p = _plan(c)
    for o in p.outputs:
        for t in o.tensors:
            if GPT_OSS.classify(t.name):
                assert t.shape[0] == 4
    assert p.config["num_local_experts"] == 4 and p.config["num_experts_per_tok"] == 2
    assert p.config["experts_per_token"] == 2


def test_segments_coalesce_adjacent_experts(tiny):
    c = Checkpoint.open(str(tiny))
    from planners.policies import KeepDecision
    keep = {0: (0, 1, 2, 5), 1: (3, 4, 6, 7)}
    p = build_plan(c, KeepDecision(keep, {}, 2))
    t = next(t for o in p.outputs for t in o.tensors if t.name == "model.layers.0.mlp.experts.down_proj_blocks")
    src = c.tensors[t.name]
    row = src.nbytes // 8
    assert [(s.offset - src.begin, s.length) for s in t.segments] == [(0, 3 * row), (5 * row, row)]
    assert p.expert_mapping() == {"0": [0, 1, 2, 5], "1": [3, 4, 6, 7]}


@pytest.mark.parametrize("soft", [False, True])
def test_digest_is_the_sha256_of_the_canonical_json(tiny, tmp_path, soft):
    """The outputs are encoded once for the file and the digest; the digest stays the sha256 of
    the whole identity document as ``json.dumps(sort_keys=True)`` writes it."""
    import hashlib

    p = _plan(Checkpoint.open(str(tiny)), soft=soft)
    p.save(str(tmp_path / "plan.json"))
    q = Plan.load(str(tmp_path / "plan.json"))
    for plan in (p, q):
        plain = json.dumps(plan.identity_json(), sort_keys=True, separators=(",", ":")).encode()
        assert plan.canonical_bytes() == plain
        assert plan.digest == hashlib.sha256(plain).hexdigest() == p.digest


def test_plan_out_costs_beside_writing_and_reports_the_same(tiny, tmp_path):
    """``plan --out`` costs the plan in a forked child while it writes the file (a fresh process,
    as users run it): the report is the one made without --out, and the file is the plan."""
    import subprocess
    import sys

    sal = tmp_path / "s.json"
    cli("synth-saliency", tiny, "--out", sal)

    def run(*extra):
        p = subprocess.run([sys.executable, "-m", "rewriter.cli", "plan", str(tiny), "--saliency", str(sal),
                            "--keep-n", "4", "--json", *extra], capture_output=True, text=True, timeout=300, check=True)
        return json.loads(p.stdout)

    alone, written = run(), run("--out", str(tmp_path / "plan.json"))
    assert written["cost"] == alone["cost"] and written["cost"]["bytes_read"] > 0
    assert written["plan_digest"] == alone["plan_digest"] == Plan.load(str(tmp_path / "plan.json")).digest


def test_plan_json_round_trip(tiny, tmp_path):
    p = _plan(Checkpoint.open(str(tiny)))
    path = tmp_path / "plan.json"
    p.save(str(path))
    q = Plan.load(str(path))
    assert q.to_json() == p.to_json()
    assert q.digest == p.digest
    assert q.outputs[0].header == p.outputs[0].header


def test_plan_save_is_whole_or_absent(tiny, tmp_path, monkeypatch):
    """A save that fails part-way (a full disk, a kill) leaves the earlier plan as it was and no
    temporary file; a save that completes replaces it."""
    from planners import plan_schema

    p = _plan(Checkpoint.open(str(tiny)))
    path = tmp_path / "plan.json"
    p.save(str(path))
    before = path.read_bytes()
    chunks = plan_schema.plan_chunks

    def failing(doc, *rest):
        it = chunks(doc, *rest)
        yield next(it)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plan_schema, "plan_chunks", failing)
    with pytest.raises(OSError):
        p.save(str(path))
    assert path.read_bytes() == before and sorted(x.name for x in tmp_path.iterdir()) == ["plan.json"]
    with pytest.raises(OSError):
        p.save(str(tmp_path / "new.json"))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plan.json"]
    monkeypatch.undo()
    p.save(str(tmp_path / "new.json"))
    assert Plan.load(str(tmp_path / "new.json")).digest == p.digest


def test_plan_rejects_tampering(tiny, tmp_path):
    doc = _plan(Checkpoint.open(str(tiny))).to_json()
    doc["outputs"][0]["tensors"][0]["segments"][0][2] += 2
    with pytest.raises(PlanError, match="does not match"):
        Plan.from_json(doc, "p.json")
    doc["version"] = 99
    with pytest.raises(PlanError, match="version 99"):
        Plan.from_json(doc, "p.json")
    with pytest.raises(PlanError, match="not a plan"):
        Plan.from_json({"x": 1}, "p.json")


def test_plan_refused_against_changed_source(fresh_tiny):
    p = _plan(Checkpoint.open(str(fresh_tiny)))
    write_checkpoint(fresh_tiny, PRESETS["tiny"].with_layers(2))  # same bytes: accepted
    check_source(p, Checkpoint.open(str(fresh_tiny)))
    cfg = PRESETS["tiny"]
    import dataclasses
    write_checkpoint(fresh_tiny, dataclasses.replace(cfg, vocab=320))
    with pytest.raises(PlanError, match="changed since the plan was made"):
        check_source(p, Checkpoint.open(str(fresh_tiny)))


def test_cost_totals_equal_plan_sums(tiny):
    p = _plan(Checkpoint.open(str(tiny)), max_shard_bytes=60_000)
    r = estimate(p, workers=2, read_bytes_per_s=1e8, write_bytes_per_s=5e7, buffer_bytes=4096, max_gap=0)
    segs = [s for o in p.outputs for t in o.tensors for s in t.segments]
    assert r.bytes_read == sum(s.length for s in segs) == sum(lc.bytes_read for lc in r.layers)
    assert r.bytes_written == sum(o.size for o in p.outputs)
    assert r.output_shards == len(p.outputs) > 1
    assert sum(lc.segments for lc in r.layers) == len(segs)
    ops = [op for o in p.outputs for op in o.copy_ops()]
    assert r.copy_ops == len(ops) <= len(segs)
    assert r.range_requests == sum(math.ceil(op.length / 4096) for op in ops)
    serial = sum(o.data_bytes / 1e8 + o.size / 5e7 for o in p.outputs)
    assert max(o.data_bytes / 1e8 + o.size / 5e7 for o in p.outputs) <= r.est_seconds <= serial
    assert r.layer(1).source_shards == ("model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors")


def test_output_shards_keep_layers_together(tiny):
    c = Checkpoint.open(str(tiny))
    p = _plan(c, max_shard_bytes=80_000)
    assert all(o.data_bytes <= 80_000 for o in p.outputs)
    for layer in (0, 1):
        holders = {o.name for o in p.outputs for t in o.tensors if t.layer == layer}
        assert len(holders) == 1, (layer, holders)
    last = len(p.outputs) - 1
    assert [o.name for o in p.outputs] == [f"model-{i:05d}-of-{last:05d}.safetensors" for i in range(last + 1)]
    order = [t.name for o in p.outputs for t in o.tensors]
    assert order[0] == "model.embed_tokens.weight"
    assert set(order[-2:]) == {"lm_head.weight", "model.norm.weight"}


def test_assign_shards_splits_only_oversized_layers():
    from planners.tensors import PlannedTensor, Segment
    ts = [PlannedTensor(f"t{i}", "U8", (n,), f"t{i}", (Segment("s", 0, n),), layer)
          for i, (n, layer) in enumerate([(40, 0), (40, 0), (30, 1), (30, 1), (150, 2), (10, 3)])]
    groups = assign_shards(ts, 100)
    assert [[t.name for t in g] for g in groups] == [["t0", "t1"], ["t2", "t3"], ["t4"], ["t5"]]


def test_layers_only_plan(tiny):
    p = _plan(Checkpoint.open(str(tiny)), layers_only=[1])
    assert [o.name for o in p.outputs] == ["layer-00001.safetensors"]
    assert all(t.layer == 1 and GPT_OSS.classify(t.name) for t in p.outputs[0].tensors)
    with pytest.raises(PlanError, match="not MoE layers"):
        _plan(Checkpoint.open(str(tiny)), layers_only=[7])


def test_other_files_copied_and_original_skipped(tiny):
    p = _plan(Checkpoint.open(str(tiny)))
    assert "tokenizer.json" in p.copy_files and "generation_config.json" in p.copy_files
    assert "original/model.safetensors" in p.skipped_files
    assert "config.json" not in p.copy_files


def test_planning_sparse_120b_reads_only_headers(tmp_path):
    write_checkpoint(tmp_path, PRESETS["120b"], sparse=True)
    sal = synthetic_saliency(36, 128, 4, seed=0)
    sal.save(tmp_path / "s.json")
    out = json.loads(cli("plan", tmp_path, "--saliency", tmp_path / "s.json", "--keep-frac", "0.5", "--workers", "4",
                         "--out", tmp_path / "plan.json", "--json"))
    cost = out["cost"]
    assert cost["output_shards"] >= 7
    c = Checkpoint.open(str(tmp_path))
    assert cost["source_bytes"] == sum(s.size for s in c.shards.values())
    # The plan was made from headers alone: reading it back, only headers were read.
    p = Plan.load(str(tmp_path / "plan.json"))
    assert p.config["num_local_experts"] == 64
    expert_bytes = 64 * 13_242_242 * 36
    assert cost["bytes_read"] == c.total_size - expert_bytes
    text = cli("plan", tmp_path, "--saliency", tmp_path / "s.json", "--keep-frac", "0.5", "--workers", "4",
               "--read-mbps", "500", "--write-mbps", "400")
    assert "estimate:" in text and "4 worker(s) at 500 MB/s read per request" in text
    assert "400 MB/s write per worker" in text
    assert "\n18  " in text


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


def test_saliency_validation_errors(tmp_path):
    good = synthetic_saliency(2, 8, 2).to_json()
    assert load_saliency(_write(tmp_path / "ok.json", good), 8, [0, 1]).domain == "synthetic"
    cases = {
        "nan": ("freq", 0, float("nan"), "expected a finite number"),
        "inf": ("reap", 1, float("inf"), "expected a finite number"),
        "neg count": ("freq", 2, -1, "expected >= 0"),
        "neg reap": ("reap", 3, -0.5, "expected >= 0"),
    }
    for name, (metric, expert, value, msg) in cases.items():
        doc = json.loads(json.dumps(good))
        doc["layers"]["0"][metric][expert] = value
        with pytest.raises(SaliencyError, match=msg):
            load_saliency(_write(tmp_path / f"{name}.json", doc).replace("'", ""), 8, [0, 1])
    doc = json.loads(json.dumps(good))
    doc["layers"]["0"]["eaft_reap"][0] = -5.0  # EAFT-REAP may be negative
    load_saliency(_write(tmp_path / "eaft.json", doc), 8, [0, 1])
    with pytest.raises(SaliencyError, match="scores 8 experts, but the checkpoint has 16"):
        load_saliency(_write(tmp_path / "x.json", good), 16, [0, 1])
    with pytest.raises(SaliencyError, match="another model"):
        load_saliency(_write(tmp_path / "y.json", good), 8, [0, 1, 2])
    with pytest.raises(SaliencyError, match="not a saliency file"):
        load_saliency(_write(tmp_path / "z.json", {"layers": {}}), 8, [0, 1])
    with pytest.raises(SaliencyError, match="file not found"):
        load_saliency(str(tmp_path / "missing.json"))


def test_keep_list_errors(tmp_path):
    assert load_keep_list(_write(tmp_path / "k.json", {"0": [3, 1], "1": [0, 2]}), 8, [0, 1])[0] == {0: (1, 3), 1: (0, 2)}
    for doc, msg in [({"0": [9, 1], "1": [0, 1]}, "out of range"), ({"0": [1, 1], "1": [0, 1]}, "duplicate"),
                     ({"0": [1, 2]}, r"no keep list for MoE layers \[1\]"), ({"0": [1], "5": [1]}, "not an MoE layer")]:
        with pytest.raises(SaliencyError, match=msg):
            load_keep_list(_write(tmp_path / "k.json", doc), 8, [0, 1])


def test_cli_plan_errors_are_clear(tiny, tmp_path):
    sal = synthetic_saliency(3, 8, 2).to_json()
    out = cli("plan", tiny, "--saliency", _write(tmp_path / "s.json", sal), "--keep-n", "4", expect=2)
    assert "another model" in out and "s.json" in out
    good = _write(tmp_path / "g.json", synthetic_saliency(2, 8, 2).to_json())
    out = cli("plan", tiny, "--saliency", good, "--keep-n", "1", expect=2)
    assert "fewer than the routing top-k of 2" in out
    out = cli("plan", tiny, "--saliency", good, "--keep-n", "1", "--top-k", "1")
    assert "read:" in out


def test_nonuniform_budget_plan_is_marked(tiny, tmp_path):
    good = _write(tmp_path / "g.json", synthetic_saliency(2, 8, 2, seed=5).to_json())
    cli("plan", tiny, "--saliency", good, "--budget", "9", "--out", tmp_path / "p.json")
    p = Plan.load(str(tmp_path / "p.json"))
    assert not p.loadable
    assert sum(len(v) for v in p.keep.values()) == 9
    counts = {str(k): len(v) for k, v in sorted(p.keep.items())}
    assert p.config_patch["num_experts_per_layer"] == counts
    assert p.config_patch["num_local_experts"] == max(counts.values())


def test_planning_reads_headers_index_and_config_only(tmp_path):
    write_checkpoint(tmp_path, PRESETS["120b"], sparse=True)
    c = Checkpoint.open(str(tmp_path))
    decision = select_keep([Domain(synthetic_saliency(36, 128, 4))], list(range(36)), 128, 4, KeepPolicy(keep_frac=0.5))
    plan = build_plan(c, decision)
    headers = sum(8 + s.header_len for s in c.shards.values())
    small = sum((tmp_path / f).stat().st_size for f in ("config.json", "model.safetensors.index.json"))
    copied = sum(d["size"] for d in plan.copy_digests.values())  # hashed, so a run copies only these bytes
    assert c.storage.counter.bytes == headers + small + copied
    assert c.storage.counter.requests == 2 * 15 + 2 + len(plan.copy_files)
    assert len(plan.outputs) >= 7
