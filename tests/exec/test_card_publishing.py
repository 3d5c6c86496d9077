"""What the model card publishes: a Hub repo id as base_model (or none), the source's licence, and
no paths of the machine that made it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.test_promises import rewriter
from tests.exec.test_modelcard import front_matter

LICENSED_CARD = "---\nlicense: other\nlicense_name: acme-weights\nlicense_link: LICENSE\ntags: [a]\n---\n# Src\n"


@pytest.fixture
def cached(tmp_path, tiny, tiny_saliency) -> tuple[Path, Path]:
    """`tiny` inside a Hugging Face cache folder, with a licensed card, and its pruned output."""
    snap = tmp_path / "hub" / "models--acme--tiny-moe" / "snapshots" / "0123abc"
    shutil.copytree(tiny, snap)
    (snap / "README.md").write_text(LICENSED_CARD)
    shutil.copy(tiny_saliency, tmp_path / "sal.json")
    rewriter("prune", snap, tmp_path / "out", "--saliency", tmp_path / "sal.json", "--keep-frac", "0.5", "--quiet")
    return snap, tmp_path / "out"


def test_a_source_in_the_hf_cache_is_named_by_its_hub_id_and_keeps_its_licence(cached, tmp_path):
    snap, out = cached
    for extra in [(), ("--verify", "--src", snap)]:
        rewriter("card", out, *extra)
        text = (out / "README.md").read_text()
        meta, body = front_matter(text)
        assert meta["base_model"] == "acme/tiny-moe"
        assert {k: meta[k] for k in ("license", "license_name", "license_link")} == {
            "license": "other", "license_name": "acme-weights", "license_link": "LICENSE"}
        assert str(tmp_path) not in text and "Made from `acme/tiny-moe`" in body
        assert "| sal.json |" in body
    # verified against a local folder (the cache's copy), so the card names that folder, not the Hub repo
    assert "`rewriter verify` against `models--acme--tiny-moe/snapshots/0123abc`" in body


def test_a_local_source_is_named_by_its_folder(tmp_path, tiny, tiny_saliency):
    src = tmp_path / "models" / "my-moe"
    shutil.copytree(tiny, src)
    (src / "README.md").write_text("---\nlicense: [unclosed\n---\n# no readable front matter\n")
    keep = tmp_path / "keep.json"
    keep.write_text('{"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}')
    rewriter("prune", src, tmp_path / "out", "--keep-list", keep, "--quiet")
    rewriter("card", tmp_path / "out", "--verify", "--src", src)
    text = (tmp_path / "out" / "README.md").read_text()
    meta, body = front_matter(text)
    assert "base_model" not in meta and "license" not in meta
    assert str(tmp_path) not in text
    assert "Made from `my-moe`" in body and "keep list `keep.json`" in body and "against `my-moe`" in body


@pytest.mark.parametrize("value", ["evil\nlicense: mit", "not a repo id", "/abs/path", "a/b/c", "org--x/name",
                                   "org/name.", "", "gpt2"])
def test_base_model_must_be_a_hub_repo_id(cached, value):
    _, out = cached
    before = (out / "README.md").read_bytes()
    r = rewriter("card", out, "--base-model", value, "--verify", expect=2)
    assert r.stderr.startswith("error: --base-model ") and r.stderr.count("\n") == 1
    assert "is not a Hub repo id" in r.stderr and "OWNER/NAME" in r.stderr
    assert (out / "README.md").read_bytes() == before
    rewriter("card", out, "--base-model", "acme.labs/Tiny_MoE-2")
    assert front_matter((out / "README.md").read_text())[0]["base_model"] == "acme.labs/Tiny_MoE-2"
