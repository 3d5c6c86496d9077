"""Group-limited routing (DeepSeek-V3, GLM-4.5): a refused keep count suggests only counts that
the next try accepts."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from core.errors import PolicyError
from planners.policies import check_groups, group_counts


def _suggested(message: str) -> list[int]:
    m = re.search(r"keep (\d+)(?: or (\d+))?", message)
    return [int(g) for g in m.groups() if g] if m else []


@pytest.mark.parametrize("groups,top_k,topk_group,experts", [
    (g, k, tg, n)
    for g, k, tg, n in itertools.product((2, 3, 4, 8), (1, 2, 4, 6, 8), (None, 1, 2, 4), (8, 16, 24, 64))
    if n % g == 0 and (tg is None or tg <= g)
])
def test_every_suggestion_is_accepted(groups, top_k, topk_group, experts):
    """Planning checks the top-k (check_top_k) before the groups, so a count is accepted when
    it is at least the top-k and passes check_groups."""
    accepted = set(group_counts(groups, top_k, topk_group, experts))
    for kept in range(top_k, experts + 1):
        try:
            check_groups(kept, groups, top_k, topk_group, experts)
        except PolicyError as e:
            assert kept not in accepted
            hint = _suggested(str(e))
            assert len(set(hint)) == len(hint), str(e)
            for n in hint:
                assert top_k <= n <= experts, str(e)
                check_groups(n, groups, top_k, topk_group, experts)
            if not hint:
                assert not accepted and "no expert count" in str(e)
        else:
            assert kept in accepted


def test_plan_refusal_names_counts_the_next_plan_accepts(tmp_path):
    """The trial's case: 8 experts in 4 groups, topk_group 2, through `rewriter plan`."""
    pytest.importorskip("transformers")
    from rewriter.tools.synth import synthetic_saliency
    from tests.conftest import cli
    from tests.e2e.test_families import _build

    src = tmp_path / "ds"
    _build("deepseek_v3", src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "n_group": 4, "topk_group": 2}))
    sal = synthetic_saliency(3, 8, 2).to_json()
    sal["layers"] = {k: v for k, v in sal["layers"].items() if k in ("1", "2")}
    (tmp_path / "s.json").write_text(json.dumps(sal))
    tried = {}
    for kept in (2, 4, 6):
        out = cli("plan", src, "--saliency", tmp_path / "s.json", "--keep-n", kept, expect=2)
        assert "keep 4 or 4" not in out
        tried[kept] = _suggested(out)
    assert tried == {2: [8], 4: [8], 6: [8]}, tried
    out = cli("plan", src, "--saliency", tmp_path / "s.json", "--keep-n", "4", expect=2)
    assert "(8 is every expert: no pruning)" in out
    cli("plan", src, "--saliency", tmp_path / "s.json", "--keep-n", "8")
