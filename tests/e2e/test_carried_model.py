"""A plan carrying new router rows, loaded by transformers: the pruned model computes what the
original computes with the dropped experts masked and the kept router rows replaced."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.carried_util import plain_and_carried  # noqa: E402
from tests.conftest import cli  # noqa: E402
from tests.e2e.test_model_truth import _bf16_model, _load  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def test_carried_routers_load_and_route_in_transformers(tmp_path):
    src = _bf16_model(tmp_path)
    keep = {"0": [0, 2, 3, 6], "1": [1, 4, 5, 7]}
    _, carried, new = plain_and_carried(src, tmp_path, keep=keep)
    cli("run", carried, "--out", tmp_path / "dst", "--quiet")
    assert "OK" in cli("verify", src, tmp_path / "dst")
    assert json.loads((tmp_path / "dst" / "config.json").read_text()) == \
        json.loads((tmp_path / "plain" / "config.json").read_text())

    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 16))
    original, plain, pruned = _load(src, False), _load(tmp_path / "plain", False), _load(tmp_path / "dst", False)
    with torch.no_grad():
        for layer, kept in keep.items():
            want, got = original.model.layers[int(layer)].mlp.router, pruned.model.layers[int(layer)].mlp.router
            # The carried rows: the kept experts' original rows, doubled (as the test made them).
            assert torch.equal(got.weight, want.weight[kept] * 2) and torch.equal(got.bias, want.bias[kept] * 2)
            dropped = [e for e in range(want.weight.shape[0]) if e not in kept]
            want.weight[kept] *= 2
            want.bias[kept] *= 2
            want.bias[dropped] = float("-inf")
        expected = original(ids).logits
        got_logits = pruned(ids).logits
        assert torch.isfinite(got_logits).all()
        assert torch.equal(got_logits, expected)
        assert not torch.equal(got_logits, plain(ids).logits)  # the new rows change what the model computes
    assert sorted(new) == sorted(f"model.layers.{n}.mlp.router.{w}" for n in keep for w in ("weight", "bias"))
