"""Keep policies: which experts each layer keeps, from saliency.

Ranking is by score, descending, ties broken by the lower expert id, so every policy is
deterministic. The single-domain case is the union policy with one domain: its covering set is
a prefix of the ranking, and the cut or fill uses the same ranking, so it keeps the top ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from core.errors import PolicyError, count
from planners.saliency import Saliency


@dataclass(frozen=True)
class KeepPolicy:
    """How many experts to keep and how to choose them.

    Attributes:
        rank: saliency metric to rank by: ``freq``, ``reap`` or ``eaft_reap``.
        keep_n / keep_frac: experts kept per layer (exactly one of them).
        keep_multiple: round the kept count up to a multiple of this (fused MoE kernels like 4).
        core_top_m: always keep each layer's ``M`` highest-ranked experts.
        coverage: share of each domain's saliency mass its covering set must reach (union).
        top_k: new routing top-k (``None`` keeps the config's).
        budget: total experts over all layers; makes a non-uniform plan (not loadable by stock
            transformers).
        keep_outliers: always keep each layer's outlier ("super") experts: those whose maximum
            output norm (the saliency files' ``max_act``, the largest over the domains) lies more
            than this many standard deviations above the layer's mean (``None``: off).
    """

    rank: str = "reap"
    keep_n: int | None = None
    keep_frac: float | None = None
    keep_multiple: int = 1
    core_top_m: int = 0
    coverage: float = 0.9
    top_k: int | None = None
    budget: int | None = None
    keep_outliers: float | None = None

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Domain:
    """One calibration domain's saliency and its weight in the union."""

    saliency: Saliency
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.saliency.domain


@dataclass(frozen=True)
class KeepDecision:
    """Kept experts per layer (sorted original ids) and why each was kept."""

    keep: Mapping[int, tuple[int, ...]]
    reasons: Mapping[int, Mapping[int, tuple[str, ...]]] = field(default_factory=dict)
    top_k: int = 0

    @property
    def uniform(self) -> bool:
        return len({len(v) for v in self.keep.values()}) <= 1


def ranking(scores: Sequence[float]) -> list[int]:
    """Expert ids by score descending, lower id first on ties."""
    return sorted(range(len(scores)), key=lambda e: (-scores[e], e))


def keep_count(policy: KeepPolicy, num_experts: int, top_k: int) -> int:
    """The uniform per-layer keep count the policy asks for, checked against top-k.

    Raises:
        PolicyError: neither or both of keep_n/keep_frac, a count out of range, a count below
            the routing top-k, core experts that do not fit.
    """
    if (policy.keep_n is None) == (policy.keep_frac is None):
        raise PolicyError("give exactly one of --keep-n or --keep-frac")
    if policy.keep_n is not None:
        n = policy.keep_n
    else:
        assert policy.keep_frac is not None
        if not 0 < policy.keep_frac <= 1:
            raise PolicyError(f"--keep-frac {policy.keep_frac} must be in (0, 1]")
        n = max(1, math.floor(policy.keep_frac * num_experts + 0.5))
    m = policy.keep_multiple
    if m < 1:
        raise PolicyError(f"--keep-multiple {m} must be >= 1")
    if n % m:
        up = -(-n // m) * m
        n = up if up <= num_experts else (num_experts // m) * m
    if m > num_experts:
        raise PolicyError(f"--keep-multiple {m} exceeds the checkpoint's {num_experts} experts per layer: "
                          f"no keep count is a multiple of it; choose --keep-multiple between 1 and {num_experts}")
    if not 1 <= n <= num_experts:
        raise PolicyError(
            f"cannot keep {count(n, 'expert')} per layer: the checkpoint has {num_experts} per layer"
            + (f" and --keep-multiple {m} allows no count in range" if m > 1 else "")
        )
    check_top_k(n, top_k, policy.top_k, num_experts)
    if policy.core_top_m > n:
        raise PolicyError(f"--core-top-m {policy.core_top_m} exceeds the {n} experts kept per layer")
    return n


def check_top_k(kept: int, config_top_k: int, new_top_k: int | None, num_experts: int | None = None) -> int:
    """The effective top-k; raises when fewer experts are kept than are routed per token."""
    k = new_top_k if new_top_k is not None else config_top_k
    if new_top_k is not None and k < 1:
        raise PolicyError(f"--top-k {k} must be >= 1")
    if k < 1:
        raise PolicyError(f"the checkpoint's config routes each token to {k} experts (num_experts_per_tok or "
                          f"its family's top-k field), so not a config a MoE model can run with; fix config.json "
                          f"or give the top-k the model uses with --top-k")
    if new_top_k is not None and num_experts is not None and new_top_k > num_experts:
        raise PolicyError(
            f"--top-k {new_top_k} exceeds the checkpoint's {num_experts} experts per layer: a token "
            f"cannot route to more experts than exist; choose --top-k between 1 and {num_experts}"
        )
    if kept < k:
        hint = "lower top-k with --top-k" if new_top_k is None else "raise the keep count"
        raise PolicyError(
            f"keeping {count(kept, 'expert')} per layer is fewer than the routing top-k of {k}: every token "
            f"routes to {k} experts; keep at least {k} or {hint}"
        )
    return k


def group_counts(groups: int, top_k: int, topk_group: int | None, num_experts: int | None) -> list[int]:
    """Every per-layer expert count that group-limited routing accepts (see :func:`check_groups`)."""
    most = num_experts if num_experts else 64 * groups
    reach = topk_group or groups
    return [n for n in range(groups, most + 1, groups)
            if n // groups >= 2 and reach * (n // groups) >= top_k and n >= top_k]


def _suggest(kept: int, accepted: Sequence[int], num_experts: int | None) -> str:
    """'keep A or B': the accepted counts nearest ``kept`` below and above it."""
    below = [n for n in accepted if n < kept][-1:]
    above = [n for n in accepted if n > kept][:1]
    if not below and not above:
        return "no expert count per layer satisfies it for this checkpoint; lower --top-k"
    words = [f"keep {' or '.join(str(n) for n in below + above)}"]
    if above and above[0] == num_experts:
        words.append(f"({num_experts} is every expert: no pruning)")
    return " ".join(words)


def check_groups(kept: int, groups: int, top_k: int, topk_group: int | None, num_experts: int | None = None) -> None:
    """Group-limited routing (DeepSeek-V3, GLM-4.5) needs balanced groups; explain a refusal.

    Routing first picks ``topk_group`` of the ``groups`` expert groups by the sum of each group's
    two best scores, then the top-k experts inside them. Group ``g`` of the pruned model holds
    the kept experts of original group ``g``, so every group must keep the same number, at least
    two, and the chosen groups must still hold ``top_k`` experts. A refusal suggests only counts
    that pass every one of these rules.
    """
    if groups <= 1:
        return
    hint = _suggest(kept, group_counts(groups, top_k, topk_group, num_experts), num_experts)
    if kept % groups:
        raise PolicyError(
            f"keeping {count(kept, 'expert')} per layer is not divisible by n_group = {groups}: group-limited "
            f"routing needs the same number of experts in every group; {hint}"
        )
    per = kept // groups
    if per < 2:
        raise PolicyError(
            f"keeping {count(kept, 'expert')} in {groups} groups leaves {per} per group; group-limited routing "
            f"scores a group by its two best experts, so every group needs at least 2; {hint}"
        )
    if topk_group is not None and topk_group * per < top_k:
        raise PolicyError(
            f"with {per} experts per group and topk_group = {topk_group}, a token can reach only "
            f"{topk_group * per} experts, fewer than top-k {top_k}; {hint}"
            + (", or lower --top-k" if hint.startswith("keep") else "")
        )


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


def validate_keep_list(
    keep: Mapping[int, tuple[int, ...]], config_top_k: int, new_top_k: int | None, allow_nonuniform: bool = False,
    groups: int = 1, topk_group: int | None = None, num_experts: int | None = None,
) -> KeepDecision:
    """Check an explicit keep list: counts against top-k, group balance and, unless allowed,
    uniform counts."""
    counts = {len(v) for v in keep.values()}
    if len(counts) > 1 and not allow_nonuniform:
        raise PolicyError(
            f"the keep list keeps {sorted(counts)} experts in different layers; stock "
            f"transformers reads one expert count for all layers (pass --allow-nonuniform to plan anyway)"
        )
    k = new_top_k or config_top_k
    for c in counts:
        check_top_k(c, config_top_k, new_top_k, num_experts)
        check_groups(c, groups, k, topk_group, num_experts)
    if groups > 1 and num_experts:
        size = num_experts // groups
        for layer, ids in keep.items():
            per = [sum(1 for e in ids if e // size == g) for g in range(groups)]
            if len(set(per)) > 1:
                raise PolicyError(
                    f"keep list, layer {layer}: keeps {per} experts in groups 0..{groups - 1}; group-limited "
                    f"routing needs the same number in every group"
                )
    return KeepDecision(dict(keep), {layer: {e: ("keep-list",) for e in ks} for layer, ks in keep.items()}, k)
