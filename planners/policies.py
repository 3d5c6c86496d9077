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
