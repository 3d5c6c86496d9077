"""carry_tensors and the plan's carried field: what it refuses, what it changes (only the carried
tensors, the version and the digest), how plan files hold the bytes, and what reading them costs."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc

import pytest

from core.errors import PlanError
from planners.carried import INLINE_LIMIT, carried_bytes, carry_tensors, require_carried_bytes
from planners.carried_file import load_carried
from planners.plan import Plan
from rewriter.tools.synth import Geometry, write_checkpoint
from tests.carried_util import METHOD, router_names
from tests.conftest import cli


@pytest.fixture(scope="module")
def plan(tiny, tmp_path_factory) -> Plan:
    root = tmp_path_factory.mktemp("carry")
    (root / "keep.json").write_text(json.dumps({"0": [0, 2, 4, 6], "1": [1, 3, 5, 7]}))
    cli("plan", tiny, "--keep-list", root / "keep.json", "--out", root / "plan.json")
    return Plan.load(str(root / "plan.json"))


def _tensor(p: Plan, name: str):
    return next(t for o in p.outputs for t in o.tensors if t.name == name)


def _new(p: Plan) -> dict[str, bytes]:
    return {n: bytes((i * 7 + k) % 256 for k in range(_tensor(p, n).nbytes)) for i, n in enumerate(router_names(p))}


def test_only_the_carried_tensors_change(plan):
    new = _new(plan)
    q = carry_tensors(plan, new, method=METHOD)
    assert q.digest != plan.digest and q.version == 3 and plan.version == 2
    assert all(carried_bytes(q, n) == b for n, b in new.items())
    a, b = plan.to_json(), q.to_json()
    assert b.pop("carried") == {"method": METHOD, "tensors": dict(q.carried.tensors), "inline": {n: v.hex() for n, v in new.items()}}
    assert (a.pop("version"), b.pop("version")) == (2, 3)
    for o in b["outputs"]:
        for t in o["tensors"]:
            if t["name"] in new:
                assert len(t["segments"]) == 1 and t["segments"][0]["length"] == len(new[t["name"]])
                t["segments"] = [s.to_json() for s in _tensor(plan, t["name"]).segments]
    assert a == b


@pytest.mark.parametrize("new, expected", [
    ({"model.layers.0.mlp.router.weight.x": b""}, "is not an output tensor of the plan"),
    ({"model.layers.0.mlp.experts.down_proj_bias": b"\0" * 4 * 64 * 2}, "is an expert's tensor"),
    ({"model.layers.0.mlp.router.bias": b"\0" * 3}, "3 new bytes, but the planned BF16[4] tensor is 8 bytes"),
    ({"model.layers.0.mlp.router.bias": bytearray(8)}, "are a bytearray; expected bytes"),
])
def test_refusals_name_the_tensor(plan, new, expected):
    with pytest.raises(PlanError, match="cannot carry") as e:
        carry_tensors(plan, new, method=METHOD)
    assert expected in str(e.value) and next(iter(new)) in str(e.value)


def test_method_must_be_json_and_a_plan_carries_once(plan):
    new = _new(plan)
    for bad in ({"x": float("nan")}, {"x": object()}, ["not", "an", "object"]):
        with pytest.raises(PlanError, match="must be a JSON object"):
            carry_tensors(plan, new, method=bad)  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="already carries"):
        carry_tensors(carry_tensors(plan, new, method=METHOD), new, method=METHOD)


def test_inline_and_sidecar_plans_read_back_to_the_same_plan(plan, tmp_path, monkeypatch):
    q = carry_tensors(plan, _new(plan), method=METHOD)
    q.save(str(tmp_path / "inline.json"))
    monkeypatch.setattr("planners.carried.INLINE_LIMIT", 0)
    q.save(str(tmp_path / "side.json"))
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors"] == [q.carried.sidecar_name]
    assert not list(tmp_path.glob("*.tmp.*"))
    for name in ("inline.json", "side.json"):
        again = Plan.load(str(tmp_path / name))
        assert again == dataclasses.replace(q, origin=again.origin) and again.digest == q.digest


def test_versions_and_the_pruning_json_form(plan, tmp_path):
    q = carry_tensors(plan, _new(plan), method=METHOD)
    doc = q.to_json()
    for version, carried, expected in ((2, True, "must not have a 'carried' field"), (3, False, "must have a 'carried'"),
                                       (4, True, "this tool reads versions 2 and 3")):
        d = json.loads(json.dumps(doc))
        d["version"] = version
        if not carried:
            d.pop("carried")
        with pytest.raises(PlanError, match=expected):
            Plan.from_json(d, "p.json")
    # pruning.json records the sha256 only: verify can use it, a run cannot.
    published = q.published_json()
    assert "inline" not in published["carried"] and "sidecar" not in published["carried"]
    digest_only = Plan.from_json(published, "pruning.json")
    assert digest_only.digest == q.digest
    with pytest.raises(PlanError, match="were not loaded"):
        require_carried_bytes(digest_only)
    (tmp_path / "p.json").write_text(json.dumps(published))
    with pytest.raises(PlanError, match="by sha256 only"):
        Plan.load(str(tmp_path / "p.json"))


def test_a_huge_sidecar_header_is_refused(plan, tmp_path, monkeypatch):
    monkeypatch.setattr("planners.carried.INLINE_LIMIT", 0)
    q = carry_tensors(plan, _new(plan), method=METHOD)
    q.save(str(tmp_path / "p.json"))
    (tmp_path / q.carried.sidecar_name).write_bytes((200 << 20).to_bytes(8, "little") + b"{}")
    with pytest.raises(PlanError, match="not a sidecar this tool wrote"):
        Plan.load(str(tmp_path / "p.json"))


def test_loading_a_sidecar_holds_one_copy_of_the_bytes(tmp_path):
    """Routers of 64 of 128 experts x 16384, 4 layers: 8 MB carried, never hex in the plan."""
    g = Geometry(4, 128, 4, 16384, 64, 256, 4, 2, 16, 4_000_000_000)
    write_checkpoint(tmp_path / "src", g, sparse=True)
    (tmp_path / "keep.json").write_text(json.dumps({str(n): list(range(0, 128, 2)) for n in range(4)}))
    cli("plan", tmp_path / "src", "--keep-list", tmp_path / "keep.json", "--out", tmp_path / "plain.json")
    p = Plan.load(str(tmp_path / "plain.json"))
    q = carry_tensors(p, _new(p), method=METHOD)
    carried = sum(len(carried_bytes(q, n)) for n in q.carried.tensors)
    assert carried > 20 * INLINE_LIMIT
    q.save(str(tmp_path / "carried.json"))
    assert (tmp_path / "carried.json").stat().st_size < (tmp_path / "plain.json").stat().st_size + 4096

    doc = json.loads((tmp_path / "carried.json").read_text())
    digest_only = Plan.from_json(doc, str(tmp_path / "carried.json"))
    tracemalloc.start()
    loaded = load_carried(digest_only, doc, str(tmp_path / "carried.json"))
    held, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert loaded.digest == q.digest
    assert carried <= held and top < 1.5 * carried  # one copy held, and no second one on the way
