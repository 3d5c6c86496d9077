"""Fitting a plan to serving targets: the nearest kept count every target accepts, and a refusal that says what would."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from core.errors import PlanError
from core.layouts import Layout
from planners.plan import Plan
from planners.policies import KeepPolicy, keep_count
from planners.serving import Verdict, check_facts, failures
from planners.serving_facts import ServingFacts, plan_facts


def fit_count(facts: ServingFacts, wanted: int, total: int, targets: Sequence[str], ep: int | None,
              multiple: int = 1) -> int | None:
    """The count nearest to ``wanted`` (up first, on a tie) in ``1..total`` that every target accepts.

    With ``ep`` the count must also split evenly over the ranks, even for an engine that would
    only warn: asking for expert parallelism means asking for an even split. When ``wanted``
    prunes, keeping every expert (``total``) is suggested only when no smaller count passes.
    """
    candidates = sorted(range(1, total + 1),
                        key=lambda n: (n == total != wanted, abs(n - wanted), n < wanted))
    for n in candidates:
        if n % multiple or (ep and n % ep):
            continue
        if not failures(check_facts(facts.with_count(n), targets, ep)):
            return n
    return None


def refusal(verdicts: Sequence[Verdict], suggestion: int | None, ep: int | None = None,
            soft_count: int | None = None, multiple: int = 1) -> PlanError:
    """The error a plan refuses with: every failing rule, and what to do.

    ``soft_count``: the plan is a soft prune, which keeps all ``soft_count`` experts.
    """
    bad = failures(verdicts)
    lines = [f"  {v.target} {v.rule}: {v.message} ({v.source})" for v in bad]
    targets = list(dict.fromkeys(v.target for v in verdicts))
    if soft_count is not None:
        hint = (f"a soft prune keeps all {soft_count} experts, so the count cannot move: drop the --target "
                f"that rejects it, or prune structurally (prune) to a count it accepts")
    elif any(v.rule == "uniform" for v in bad):
        hint = ("these engines build every layer with one expert count: plan with --keep-n or --keep-frac "
                "instead of different counts per layer (--budget, a non-uniform keep list), or drop --target")
    elif suggestion is not None:
        hint = f"keep {suggestion} experts per layer (--keep-n {suggestion}), or pass --fit-targets to adjust the count"
    else:
        hint = _no_count_hint(targets, ep, multiple)
    return PlanError("the serving targets would reject this output:\n" + "\n".join(lines) + f"\n{hint}")


def _no_count_hint(targets: Sequence[str], ep: int | None, multiple: int) -> str:
    """What to do when no expert count passes: relax what narrows the counts tried, or the targets."""
    which = "every target" if len(targets) > 1 else targets[0]
    limits = {flag: v for flag, v in (("--ep", ep or 1), ("--keep-multiple", multiple)) if v > 1}
    if limits:
        given = " and ".join(f"{flag} {v}" for flag, v in limits.items())
        return (f"no expert count satisfies {which} together with {given}; change {' or '.join(limits)}"
                + (", or drop a --target" if len(targets) > 1 else ""))
    if len(targets) > 1:
        return "no expert count satisfies every target; drop a --target"
    return f"no expert count per layer satisfies {which}; fix the failing rules above, or drop --target {which}"


def with_top_k(facts: ServingFacts, k: int | None) -> ServingFacts:
    """The facts once the routing top-k is rewritten to ``k`` (``None``: unchanged)."""
    if k is None:
        return facts
    return dataclasses.replace(facts, topk_fields={f: k for f in facts.topk_fields} or {"num_experts_per_tok": k})


def fit_policy(policy: KeepPolicy, facts: ServingFacts, num_experts: int, top_k: int, targets: Sequence[str],
               ep: int | None) -> tuple[KeepPolicy, str | None]:
    """``--fit-targets``: move the policy's keep count to the nearest one every target accepts.

    Returns:
        The policy (with ``keep_n`` set when the count moved) and a sentence saying what moved and
        why, or ``None`` when the asked-for count already passes.

    Raises:
        PlanError: no count in ``1..num_experts`` passes every target.
    """
    n = keep_count(policy, num_experts, top_k)
    facts = with_top_k(facts, policy.top_k)
    fitted = fit_count(facts, n, num_experts, targets, ep, policy.keep_multiple)
    if fitted is None:
        raise refusal(check_facts(facts.with_count(n), targets, ep), None, ep, multiple=policy.keep_multiple)
    if fitted == n:
        return policy, None
    why = "; ".join(f"{v.target} {v.rule}: {v.message}" for v in failures(check_facts(facts.with_count(n), targets, ep)))
    note = f"--fit-targets: keeping {fitted} experts per layer instead of {n} ({why})"
    return dataclasses.replace(policy, keep_n=fitted, keep_frac=None), note


def apply_targets(plan: Plan, layout: Layout, targets: Sequence[str], ep: int | None) -> Plan:
    """Check a plan's output against ``targets``; refuse on a failure, else record the verdicts.

    The verdicts go into the plan's provenance (``serving``), so ``pruning.json`` and the model
    card say which targets were checked.

    Raises:
        PlanError: a target would reject the output; the message lists each failing rule and the
            nearest count every target accepts.
    """
    facts = plan_facts(plan, layout)
    verdicts = check_facts(facts, targets, ep)
    if failures(verdicts):
        total = int(plan.provenance.get("source_experts_per_layer") or facts.count)
        if plan.soft:
            raise refusal(verdicts, None, ep, soft_count=facts.count)
        raise refusal(verdicts, fit_count(facts, facts.count, total, targets, ep), ep)
    serving = {"targets": list(targets), "ep": ep, "verdicts": [v.to_json() for v in verdicts]}
    return dataclasses.replace(plan, provenance={**plan.provenance, "serving": serving})
