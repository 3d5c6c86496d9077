"""Keep policies, property-based: counts, ranges, ranking, core, multiples, union semantics."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from core.errors import PolicyError
from planners.policies import Domain, KeepPolicy, keep_count, ranking, validate_keep_list
from planners.saliency import Saliency
from planners.selection import covering_set, select_keep, select_layer

scores_st = st.lists(st.floats(0, 1000, allow_nan=False), min_size=4, max_size=64)


def _sal(layers: dict[int, list[float]], domain: str = "d") -> Saliency:
    return Saliency(domain, {k: {"freq": tuple(float(round(x)) for x in v), "reap": tuple(v),
                                 "eaft_reap": tuple(v)} for k, v in layers.items()})


@given(scores_st, st.data())
def test_single_domain_keeps_top_n_by_rank(scores, data):
    _check_keeps_top_n(scores, data.draw(st.integers(2, len(scores))))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_single_domain_keeps_top_n_of_tiny_scores(n):
    # The property above failed once here: normalization rounds 5e-324 / 2 to 0.0.
    _check_keeps_top_n([0.0, 0.0, 2.0, 5e-324], n)


def _check_keeps_top_n(scores, n):
    n_exp = len(scores)
    d = select_keep([Domain(_sal({0: scores}))], [0], n_exp, 2, KeepPolicy(keep_n=n))
    kept = d.keep[0]
    assert len(kept) == n and len(set(kept)) == n
    assert all(0 <= e < n_exp for e in kept)
    assert list(kept) == sorted(kept)
    assert set(kept) == set(ranking(scores)[:n])
    dropped = set(range(n_exp)) - set(kept)
    assert all(scores[k] >= scores[x] for k in kept for x in dropped)


def test_ties_break_by_lower_id():
    d = select_keep([Domain(_sal({0: [1.0] * 8}))], [0], 8, 2, KeepPolicy(keep_n=3))
    assert d.keep[0] == (0, 1, 2)


@given(st.integers(4, 128), st.floats(0.01, 1.0), st.integers(1, 8))
def test_keep_frac_and_multiple(n_exp, frac, mult):
    try:
        n = keep_count(KeepPolicy(keep_frac=frac, keep_multiple=mult), n_exp, 1)
    except PolicyError:
        assume(False)
    assert 1 <= n <= n_exp
    assert n % mult == 0
    base = max(1, int(frac * n_exp + 0.5))
    assert abs(n - base) < mult


@given(scores_st, st.data())
def test_core_experts_always_kept(scores, data):
    n_exp = len(scores)
    n = data.draw(st.integers(2, n_exp))
    m = data.draw(st.integers(0, n))
    other = data.draw(st.lists(st.floats(0, 1000, allow_nan=False), min_size=n_exp, max_size=n_exp))
    domains = [Domain(_sal({0: scores}, "a")), Domain(_sal({0: other}, "b"), 3.0)]
    d = select_keep(domains, [0], n_exp, 2, KeepPolicy(keep_n=n, core_top_m=m, coverage=0.5))
    combined_rank = select_layer(domains, 0, n_exp, KeepPolicy(keep_n=n_exp))
    assert len(d.keep[0]) == n
    # The core is the top-m of the combined score; with keep_n = all, reasons show it.
    from planners.selection import _combined
    core = ranking(_combined(domains, 0, "reap")[0])[:m]
    assert set(core) <= set(d.keep[0])
    assert all("core" in d.reasons[0][e] for e in core)
    assert len(combined_rank[0]) == n_exp


@given(st.lists(st.floats(0.001, 100, allow_nan=False), min_size=4, max_size=40), st.floats(0.1, 1.0))
def test_covering_set_is_minimal_prefix(scores, coverage):
    total = sum(scores)
    norm = [s / total for s in scores]
    cover = covering_set(norm, coverage)
    assert cover == ranking(norm)[: len(cover)]
    assert sum(norm[e] for e in cover) >= coverage - 1e-9
    if cover:
        assert sum(norm[e] for e in cover[:-1]) < coverage - 1e-12


def test_union_keeps_each_domains_cover_and_records_who_asked():
    # Domain a loves experts 0,1; domain b loves 6,7; 8 experts, keep 4.
    a = [50, 40, 1, 1, 1, 1, 1, 1]
    b = [1, 1, 1, 1, 1, 1, 30, 60]
    d = select_keep([Domain(_sal({0: a}, "a")), Domain(_sal({0: b}, "b"))], [0], 8, 2,
                    KeepPolicy(keep_n=4, coverage=0.8))
    assert d.keep[0] == (0, 1, 6, 7)
    assert d.reasons[0][0] == ("a",) and d.reasons[0][7] == ("b",)


def test_domain_normalization_stops_big_domain_dominating():
    # Domain a has 1000x the raw mass; without normalization it would take every slot.
    a = [5000, 4000, 3000, 2000, 10, 10, 10, 10]
    b = [1, 1, 1, 1, 9, 8, 2, 1]
    d = select_keep([Domain(_sal({0: a}, "a")), Domain(_sal({0: b}, "b"))], [0], 8, 2,
                    KeepPolicy(keep_n=4, coverage=0.5))
    assert {4, 5} & set(d.keep[0]), d.keep[0]


def test_domain_weight_decides_the_cut():
    a = [10, 9, 8, 7, 1, 1, 1, 1]
    b = [1, 1, 1, 1, 7, 8, 9, 10]
    heavy_b = select_keep([Domain(_sal({0: a}, "a"), 1.0), Domain(_sal({0: b}, "b"), 5.0)], [0], 8, 2,
                          KeepPolicy(keep_n=2, coverage=0.9))
    heavy_a = select_keep([Domain(_sal({0: a}, "a"), 5.0), Domain(_sal({0: b}, "b"), 1.0)], [0], 8, 2,
                          KeepPolicy(keep_n=2, coverage=0.9))
    assert heavy_b.keep[0] == (6, 7)
    assert heavy_a.keep[0] == (0, 1)


def test_fill_when_union_is_small():
    a = [100, 0, 0, 0, 0, 0, 0, 1]
    d = select_keep([Domain(_sal({0: a}))], [0], 8, 2, KeepPolicy(keep_n=4, coverage=0.5))
    assert d.keep[0] == (0, 1, 2, 7)
    assert d.reasons[0][0] == ("d",) and d.reasons[0][1] == ("fill",)


@pytest.mark.parametrize("policy,match", [
    (KeepPolicy(keep_n=1), "fewer than the routing top-k of 2"),
    (KeepPolicy(keep_n=9), "has 8 per layer"),
    (KeepPolicy(), "exactly one of"),
    (KeepPolicy(keep_n=2, keep_frac=0.5), "exactly one of"),
    (KeepPolicy(keep_frac=1.5), "must be in"),
    (KeepPolicy(keep_n=4, core_top_m=5), "core-top-m"),
    (KeepPolicy(keep_n=3, top_k=4), "raise the keep count"),
])
def test_impossible_policies(policy, match):
    with pytest.raises(PolicyError, match=match):
        keep_count(policy, 8, 2)


def test_lower_top_k_allows_fewer_experts():
    assert keep_count(KeepPolicy(keep_n=1, top_k=1), 8, 2) == 1


def test_budget_is_nonuniform_and_respects_floor():
    layers = {0: [50, 40, 30, 20, 1, 1, 1, 1], 1: [1] * 8}
    d = select_keep([Domain(_sal(layers))], [0, 1], 8, 2, KeepPolicy(budget=7))
    assert sum(len(v) for v in d.keep.values()) == 7
    assert d.keep[0] == (0, 1, 2, 3) and d.keep[1] == (0, 1, 2)
    assert all(len(v) >= 2 for v in d.keep.values())
    assert not d.uniform
    with pytest.raises(PolicyError, match="budget"):
        select_keep([Domain(_sal(layers))], [0, 1], 8, 2, KeepPolicy(budget=3))


def test_keep_list_validation():
    assert validate_keep_list({0: (1, 2), 1: (3, 4)}, 2, None).top_k == 2
    with pytest.raises(PolicyError, match="different layers"):
        validate_keep_list({0: (1, 2), 1: (3, 4, 5)}, 2, None)
    with pytest.raises(PolicyError, match="fewer than the routing top-k"):
        validate_keep_list({0: (1,), 1: (3,)}, 2, None)


@settings(max_examples=30)
@given(st.lists(st.lists(st.floats(0, 100, allow_nan=False), min_size=8, max_size=8), min_size=1, max_size=3))
def test_deterministic(domain_scores):
    domains = [Domain(_sal({0: s}, f"d{i}")) for i, s in enumerate(domain_scores)]
    p = KeepPolicy(keep_n=4, core_top_m=1)
    assert select_keep(domains, [0], 8, 2, p) == select_keep(domains, [0], 8, 2, p)
