"""Choosing each layer's kept experts from saliency: one domain's ranking, the union over domains, outliers kept, a budget spread over layers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from core.errors import PolicyError
from planners.policies import Domain, KeepDecision, KeepPolicy, check_groups, keep_count, ranking


def combined_ranking(domains: Sequence[Domain], layer: int, metric: str, combined: Sequence[float]) -> list[int]:
    """Experts by combined score descending; ties by the weighted raw scores, then the lower id.

    Dividing by a domain's mass can round distinct tiny scores to the same value (5e-324 / 2 is
    0.0); the raw scores keep their order, so one domain always ranks exactly as its raw scores.
    """
    raw = [sum(d.weight * d.saliency.scores(layer, metric)[e] for d in domains) for e in range(len(combined))]
    return sorted(range(len(combined)), key=lambda e: (-combined[e], -raw[e], e))


def _combined(domains: Sequence[Domain], layer: int, metric: str) -> tuple[list[float], list[list[float]]]:
    """Domain-normalized scores (each domain's positive mass scaled to 1), and their weighted sum."""
    total_w = sum(d.weight for d in domains)
    if total_w <= 0:
        raise PolicyError("domain weights must add up to more than 0")
    normalized = []
    for d in domains:
        s = d.saliency.scores(layer, metric)
        mass = sum(max(v, 0.0) for v in s)
        normalized.append([v / mass if mass > 0 else 0.0 for v in s])
    n = len(normalized[0])
    if any(len(v) != n for v in normalized):
        raise PolicyError(f"layer {layer}: the saliency files score different numbers of experts")
    combined = [sum(d.weight / total_w * v[e] for d, v in zip(domains, normalized)) for e in range(n)]
    return combined, normalized


def covering_set(normalized: Sequence[float], coverage: float, order: Sequence[int] | None = None) -> list[int]:
    """The fewest top-ranked experts whose share of the (positive) mass reaches ``coverage``.

    ``order`` is the domain's ranking when known (its raw scores, which normalization may tie).
    """
    out: list[int] = []
    acc = 0.0
    for e in order if order is not None else ranking(normalized):
        if acc >= coverage - 1e-12 or normalized[e] <= 0:
            break
        out.append(e)
        acc += normalized[e]
    return out


def outliers(domains: Sequence[Domain], layer: int, z: float) -> list[int]:
    """Experts of ``layer`` whose maximum output norm has a z-score above ``z`` (population
    standard deviation over the layer's experts), highest first; the norm of an expert is its
    largest over the domains.

    Raises:
        PolicyError: a saliency file without ``max_act`` (older files, REAP imports).
    """
    per_domain = []
    for d in domains:
        values = d.saliency.max_act(layer)
        if values is None:
            raise PolicyError(
                f"{d.saliency.source or d.name}: layer {layer} records no maximum activation norms "
                f"(max_act; files profiled before it existed and REAP imports have none): profile "
                f"again with `rewriter profile`, or drop --keep-outliers")
        per_domain.append(values)
    peak = [max(v[e] for v in per_domain) for e in range(len(per_domain[0]))]
    mean = sum(peak) / len(peak)
    sd = math.sqrt(sum((v - mean) ** 2 for v in peak) / len(peak))
    if sd == 0:
        return []
    scores = [(v - mean) / sd for v in peak]
    return [e for e in ranking(scores) if scores[e] > z]


def select_layer(
    domains: Sequence[Domain], layer: int, n: int, policy: KeepPolicy, groups: int = 1
) -> tuple[tuple[int, ...], dict[int, tuple[str, ...]]]:
    """Keep ``n`` experts of one layer: outliers and core, then the union of covering sets, cut
    or filled.

    With ``groups`` > 1 the same happens inside each contiguous expert group with a quota of
    ``n / groups``. More outliers than ``n`` keep the ``n`` with the highest z-scores.
    """
    combined, normalized = _combined(domains, layer, policy.rank)
    order = combined_ranking(domains, layer, policy.rank, combined)
    forced = outliers(domains, layer, policy.keep_outliers)[:n] if policy.keep_outliers is not None else []
    core = forced + [e for e in order if e not in forced][: max(0, min(policy.core_top_m, n - len(forced)))]
    wanted: dict[int, list[str]] = {e: ["outlier" if e in forced else "core"] for e in core}
    for d, norm in zip(domains, normalized):
        for e in covering_set(norm, policy.coverage, ranking(d.saliency.scores(layer, policy.rank))):
            wanted.setdefault(e, []).append(d.name)
    if groups > 1:
        return _select_grouped(order, core, wanted, n, groups, layer)
    rest = [e for e in order if e in wanted and e not in core]
    kept = core + rest[: n - len(core)]
    for e in order:
        if len(kept) >= n:
            break
        if e not in wanted:
            kept.append(e)
            wanted[e] = ["fill"]
    return tuple(sorted(kept)), {e: tuple(wanted[e]) for e in sorted(kept)}


def _select_grouped(order: list[int], core: list[int], wanted: Mapping[int, list[str]], n: int, groups: int,
                    layer: int) -> tuple[tuple[int, ...], dict[int, tuple[str, ...]]]:
    size = len(order) // groups
    quota = n // groups
    kept: list[int] = []
    reasons: dict[int, tuple[str, ...]] = {}
    for g in range(groups):
        members = [e for e in order if e // size == g]
        g_core = [e for e in core if e // size == g]
        if len(g_core) > quota:
            raise PolicyError(
                f"layer {layer}: {len(g_core)} core experts fall in group {g}, more than its quota of "
                f"{quota} ({n} kept / {groups} groups); lower --core-top-m"
            )
        picked = g_core + [e for e in members if e in wanted and e not in g_core][: quota - len(g_core)]
        picked += [e for e in members if e not in picked][: quota - len(picked)]
        kept += picked
        reasons.update({e: tuple(wanted.get(e, ["group-fill"])) for e in picked})
    return tuple(sorted(kept)), {e: reasons[e] for e in sorted(kept)}


def select_keep(
    domains: Sequence[Domain], layers: Sequence[int], num_experts: int, config_top_k: int, policy: KeepPolicy,
    groups: int = 1, topk_group: int | None = None,
) -> KeepDecision:
    """Apply ``policy`` to every layer.

    Args:
        groups / topk_group: group-limited routing of the family (see :func:`check_groups`).

    Raises:
        PolicyError: see :func:`keep_count` and :func:`check_groups`; for budgets, a budget the
            layers cannot meet.
    """
    if not domains:
        raise PolicyError("no saliency given: pass --saliency FILE (one per domain) or --keep-list FILE")
    if policy.budget is not None:
        if policy.keep_outliers is not None:
            raise PolicyError("--keep-outliers works with a uniform count (--keep-n/--keep-frac), not with --budget")
        if groups > 1:
            raise PolicyError("--budget (different counts per layer) is not supported with group-limited routing")
        return _select_budget(domains, layers, num_experts, config_top_k, policy)
    n = keep_count(policy, num_experts, config_top_k)
    check_groups(n, groups, policy.top_k or config_top_k, topk_group, num_experts)
    keep, reasons = {}, {}
    for layer in layers:
        keep[layer], reasons[layer] = select_layer(domains, layer, n, policy, groups)
    return KeepDecision(keep, reasons, policy.top_k or config_top_k)


def _select_budget(
    domains: Sequence[Domain], layers: Sequence[int], num_experts: int, config_top_k: int, policy: KeepPolicy
) -> KeepDecision:
    """Split ``policy.budget`` experts across layers by globally ranked, layer-normalized scores."""
    assert policy.budget is not None
    floor = max(policy.top_k or config_top_k, policy.core_top_m, 1)
    lo, hi = floor * len(layers), num_experts * len(layers)
    if not lo <= policy.budget <= hi:
        raise PolicyError(
            f"--budget {policy.budget} must be between {lo} ({floor} per layer: top-k/core) and "
            f"{hi} (every expert)"
        )
    scored = {layer: _combined(domains, layer, policy.rank)[0] for layer in layers}
    keep = {layer: ranking(s)[:floor] for layer, s in scored.items()}
    pool = sorted(
        ((s[e], layer, e) for layer, s in scored.items() for e in ranking(s)[floor:]),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    for _, layer, e in pool[: policy.budget - lo]:
        keep[layer].append(e)
    reasons = {layer: {e: ("budget",) for e in ks} for layer, ks in keep.items()}
    return KeepDecision({k: tuple(sorted(v)) for k, v in keep.items()}, reasons, policy.top_k or config_top_k)
