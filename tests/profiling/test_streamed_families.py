"""The layer-streamed engine against the whole-model path for every supported MoE model type of
the installed transformers: a tiny model of each (``tests/moe_catalog.py``) is profiled both ways
on the same tokens, and the saliency must be the same (frequencies exactly, REAP and EAFT-REAP
within 1e-5). A type the engine cannot run is refused with one clear error, whose text is the
reason the README's families table gives; ``docs/families.json`` records per type what this test
saw (``streamed_profile``), and each run checks its own row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from core.errors import RewriterError
from tests.e2e.test_every_family import committed

pytestmark = [pytest.mark.torch, pytest.mark.slow]

MATCHED = "matched"


def _reason(e: RewriterError, src: Path) -> str:
    """The error without the machine's path of the tiny model, so the text is the same anywhere."""
    return str(e).replace(f"{src}: ", "").replace(str(src), "MODEL")


def streamed_outcome(model_type: str, tmp_path: Path) -> dict:
    """Profile a tiny ``model_type`` whole and streamed; what happened, and how far apart the
    results are (an assertion fails where they differ)."""
    pytest.importorskip("transformers")
    from profiling.profile import profile
    from tests.moe_catalog import build

    src = tmp_path / "src"
    build(model_type, str(src))
    rng = np.random.default_rng(0)
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps({"input_ids": rng.integers(3, 128, 20).tolist()}) + "\n" for _ in range(4)))
    kw = dict(seq_len=16, batch_size=2, device="cpu")  # 80 tokens: 2 batches of 2 x 16, 2 of 1 x 4
    row = {"model_type": model_type}
    try:
        whole = profile(str(src), [str(data)], streamed=False, **kw)
    except RewriterError as e:
        return {**row, "streamed_profile": f"not profiled: {_reason(e, src)}"}
    try:
        streamed = profile(str(src), [str(data)], streamed=True, **kw)
    except RewriterError as e:
        return {**row, "streamed_profile": f"not streamed: {_reason(e, src)}"}
    assert streamed.method["streamed"] and not whole.method["streamed"]
    assert streamed.tokens == whole.tokens == 80 and set(streamed.layers) == set(whole.layers) and whole.layers
    worst = 0.0
    for layer, w in whole.layers.items():
        s = streamed.layers[layer]
        assert s["freq"] == w["freq"], (model_type, layer)
        for key in ("reap", "eaft_reap"):
            np.testing.assert_allclose(s[key], w[key], rtol=1e-5, atol=1e-7, err_msg=f"{model_type} {layer} {key}")
            a, b = np.array(w[key]), np.array(s[key])
            worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12))))
    assert sum(sum(whole.layers[i]["freq"]) for i in whole.layers) > 0
    return {**row, "streamed_profile": MATCHED, "streamed_max_rel_diff": worst}


def _types() -> list[str]:
    return sorted(t for t, row in committed().items() if row["status"] == "supported")


@pytest.mark.parametrize("model_type", _types())
def test_streamed_saliency_equals_whole_model(model_type, tmp_path):
    result = streamed_outcome(model_type, tmp_path)
    out = os.environ.get("REWRITER_STREAMED_RESULTS")
    if out:  # what this run saw goes to the results the README table is rendered from
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")
        return
    want = committed()[model_type].get("streamed_profile")
    if want is not None:
        assert result["streamed_profile"] == want


def test_profile_of_experts_it_cannot_observe_is_one_clear_error(tmp_path):
    """Llama-4's text experts do not use transformers' experts interface: `profile` says so, whole
    or streamed, with exit 2 and what to do instead, and writes nothing."""
    pytest.importorskip("transformers")
    from tests.conftest import cli
    from tests.moe_catalog import build

    build("llama4_text", str(tmp_path / "src"))
    data = tmp_path / "cal.jsonl"
    data.write_text(json.dumps({"input_ids": list(range(3, 40))}) + "\n")
    for mode in ("--streamed", "--no-streamed"):
        out = cli("profile", tmp_path / "src", "--data", data, "--out", tmp_path / "s.json", "--seq-len", "16",
                  "--device", "cpu", "--quiet", mode, expect=2)
        assert out.startswith("error: ") and len(out.strip().splitlines()) == 1, out
        assert "does not use transformers' experts interface" in out and "--keep-list" in out
        assert not (tmp_path / "s.json").exists()
