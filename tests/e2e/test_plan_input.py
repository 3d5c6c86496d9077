"""Hand-edited plans: every field is type-checked and the expert mapping must be the one the
plan's tensors hold. Each bad plan is one rc-2 line naming the plan file and the field, through
``rewriter run`` (what a user runs with a plan), and nothing is written."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli


@pytest.fixture(scope="module")
def plan_doc(tmp_path_factory, tiny, tiny_saliency) -> dict[str, Any]:
    p = tmp_path_factory.mktemp("plan") / "plan.json"
    cli("plan", tiny, "--saliency", tiny_saliency, "--keep-frac", "0.5", "--out", p)
    return json.loads(p.read_text())


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        obj = doc
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return edit


def _drop(key: str) -> Callable[[dict], None]:
    return lambda doc: doc.pop(key)


CASES = [
    ("config", _set(("config",), [1]), "'config' is [1]; expected a JSON object"),
    ("family", _set(("family",), "llama"), "'family' is 'llama'; expected one of"),
    ("provenance", _set(("provenance",), "x"), "'provenance' is 'x'; expected a JSON object"),
    ("mode", _set(("mode",), "destroy"), "'mode' is 'destroy'"),
    ("layer", _set(("outputs", 0, "tensors", 0, "layer"), "zero"), "tensors[0].layer' is 'zero'"),
    ("outputs", _set(("outputs",), []), "'outputs' is []; expected a non-empty list"),
    ("no-outputs", _drop("outputs"), "the plan has no 'outputs' field"),
    ("url-null", _set(("source", "url"), None), "'source.url' is None"),
    ("url-int", _set(("source", "url"), 5), "'source.url' is 5"),
    ("url-relative", _set(("source", "url"), "t1"), "an absolute path or a URL"),
    ("map-negative", _set(("expert_mapping", "0"), [-1, 5, 6, 7]), "expert_mapping['0']\" is [-1, 5, 6, 7]"),
    ("map-strings", _set(("expert_mapping", "0"), ["a", "b", "c"]), "expert_mapping['0']\" is ['a', 'b', 'c']"),
    ("map-unsorted", _set(("expert_mapping", "0"), [5, 2, 6, 7]), "increasing list of distinct"),
    ("map-key", lambda d: d["expert_mapping"].update({"x": [1]}), "a layer number as the key"),
    ("map-huge", _set(("expert_mapping", "0"), [2, 5, 6, 10**20]), "has 8 experts per layer"),
    ("map-layers", lambda d: d["expert_mapping"].pop("1"), "covers layers [0]"),
    ("top-k", _set(("top_k",), "2"), "'top_k' is '2'"),
    ("reasons", _set(("keep_reasons",), {"0": {"1": [3]}}), "keep_reasons['0']['1']"),
]


@pytest.mark.parametrize("name,edit,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_plan_field_is_one_clear_error(tmp_path: Path, plan_doc, name, edit, expected):
    doc = copy.deepcopy(plan_doc)
    edit(doc)
    bad = tmp_path / f"{name}.json"
    bad.write_text(json.dumps(doc))
    out = cli("run", bad, "--out", tmp_path / "dst", expect=2)
    assert out.startswith(f"error: {bad}"), out
    assert expected in out, out
    assert "Traceback" not in out and "internal error" not in out
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())


def test_mapping_other_than_the_tensors_is_refused(tmp_path: Path, plan_doc):
    """Valid ids, but not the experts the plan's bytes hold: the card would lie."""
    doc = copy.deepcopy(plan_doc)
    kept = doc["expert_mapping"]["0"]
    doc["expert_mapping"]["0"] = [e for e in range(8) if e not in kept][: len(kept)]
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(doc))
    out = cli("run", bad, "--out", tmp_path / "dst", expect=2)
    assert f"error: {bad}: expert_mapping does not match its tensors" in out, out


def test_unedited_plan_still_runs(tmp_path: Path, plan_doc):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(plan_doc))
    cli("run", good, "--out", tmp_path / "dst")
    written = json.loads((tmp_path / "dst" / "pruning.json").read_text())
    assert written["plan"]["expert_mapping"] == plan_doc["expert_mapping"]


def test_verify_finds_an_edited_mapping_in_pruning_json(tmp_path: Path, tiny, plan_doc):
    """pruning.json carries the plan; a mapping edited there no longer matches the bytes."""
    good = tmp_path / "good.json"
    good.write_text(json.dumps(plan_doc))
    dst = tmp_path / "dst"
    cli("run", good, "--out", dst)
    cli("verify", tiny, dst)
    record = json.loads((dst / "pruning.json").read_text())
    kept = record["plan"]["expert_mapping"]["0"]
    record["plan"]["expert_mapping"]["0"] = [e for e in range(8) if e not in kept][: len(kept)]
    (dst / "pruning.json").write_text(json.dumps(record))
    out = cli("verify", tiny, dst, expect=1)
    assert f"{dst / 'pruning.json'}: expert_mapping does not match its tensors" in out, out
