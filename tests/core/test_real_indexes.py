"""The families' descriptions against real checkpoints' tensor names. ``tests/assets/real_indexes``
holds the tensor names of public ``model.safetensors.index.json`` files (names only, gzipped, with
the config fields that decide the experts and where each came from). Every name must be classified
as its spelling says (a numbered expert, a fused expert tensor, a router, or untouched), and the
layout's own checks must find exactly the MoE layers the config's dense-layer fields imply."""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.layouts import layout_for_config

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "real_indexes"
FILES = sorted(ASSETS.glob("*.json.gz"))
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_NUMBERED = re.compile(r"\.experts\.(\d+)\.")
# Fused: stacked under ``experts`` (gpt-oss), or Granite's ``input_linear`` / ``output_linear``.
_FUSED = re.compile(r"\.experts\.[a-z_]+[a-z0-9_]*(?:\.weight)?$|\.block_sparse_moe\.(?:in|out)put_linear\.weight$")
_ROUTER = re.compile(r"\.(?:gate|router|router\.layer)\.(?:weight|bias|e_score_correction_bias)$")


def load(path: Path) -> dict[str, Any]:
    return json.loads(gzip.decompress(path.read_bytes()))


@dataclass(frozen=True)
class _Info:
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Storage:
    def describe(self, name: str) -> str:
        return name


@dataclass(frozen=True)
class _View:
    """A checkpoint as its index names it: shapes only say which dimension is the expert count."""

    url: str
    config: dict[str, Any]
    tensors: dict[str, _Info]
    storage: _Storage = _Storage()


def expected_role(name: str) -> str | None:
    """What a tensor is, by its spelling alone."""
    if "shared_expert" in name:
        return None
    if _NUMBERED.search(name):
        return "expert"
    if _FUSED.search(name):
        return "fused"
    return "router" if _ROUTER.search(name) else None


def dense_first(config: dict[str, Any], layers: set[int]) -> set[int]:
    """The MoE layers among ``layers`` by the config's dense-layer fields."""
    k = config.get("first_k_dense_replace") or 0
    step = config.get("decoder_sparse_step") or 1
    dense = set(config.get("mlp_only_layers") or [])
    return {i for i in layers if i >= k and (i + 1) % step == 0 and i not in dense}


@pytest.mark.parametrize("path", FILES, ids=[p.name.split(".")[0] for p in FILES])
def test_every_name_of_a_real_index_is_classified_as_its_spelling_says(path):
    doc = load(path)
    layout = layout_for_config(doc["config"])
    assert layout is not None and doc["config"]["model_type"] in layout.model_types
    wrong = []
    for name in doc["names"]:
        t, want = layout.classify(name), expected_role(name)
        got = None if t is None else t.role
        if got != want:
            wrong.append((name, got, want))
        elif t is not None and t.role == "expert":
            m = _NUMBERED.search(name)
            assert m and t.expert == int(m.group(1)) and t.layer == int(_LAYER.findall(name)[-1]), name
    assert wrong == [], f"{path.name}: {len(wrong)} names classified otherwise than spelled, e.g. {wrong[:5]}"


@pytest.mark.parametrize("path", FILES, ids=[p.name.split(".")[0] for p in FILES])
def test_a_real_index_passes_the_layout_checks_with_the_moe_layers_its_config_implies(path):
    doc = load(path)
    config = doc["config"]
    layout = layout_for_config(config)
    assert layout is not None
    n = layout.num_experts(config)
    tensors = {}
    for name in doc["names"]:
        t = layout.classify(name)
        shape = (n, 2) if t is not None and t.role != "expert" else (2, 2)
        tensors[name] = _Info(name, shape)
    moe = layout.moe_layers(_View(path.name, config, tensors))
    layers = {int(m) for name in doc["names"] for m in _LAYER.findall(name)}
    assert set(moe) == dense_first(config, layers) and moe
    for layer in moe.values():
        assert {t.role for t in layer.tensors} >= {"router"}
        numbered = {t.expert for t in layer.tensors if t.role == "expert"}
        assert numbered in (set(), set(range(n)))
