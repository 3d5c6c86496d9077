"""The planning API: from a source checkpoint and options to a :class:`~planners.plan.Plan`.

Example::

    from planners import PlanOptions, plan_prune

    plan = plan_prune("/models/gpt-oss-20b",
                      PlanOptions(saliency=("code.json",), policy=KeepPolicy(keep_frac=0.5)))
    plan.save("plan.json")

The command line, the benchmarks and the tests plan through :func:`plan_prune`; it reads only
the checkpoint's config, index and headers, and the saliency or keep-list files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.checkpoint import Checkpoint
from core.errors import CheckpointError, OptionError, SaliencyError
from core.layouts import Layout, mtp_followed
from core.memo import collector_paused
from planners.build import build_plan
from planners.keep_list import load_keep_list
from planners.plan import Plan
from planners.policies import Domain, KeepDecision, KeepPolicy, validate_keep_list
from planners.saliency import has_identity, identity_mismatch, load_saliency, model_identity
from planners.selection import select_keep
from planners.serving_facts import facts_from
from planners.serving_fit import apply_targets, fit_policy

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000


@dataclass(frozen=True)
class PlanOptions:
    """What to keep and how to lay out the output. Every field has the CLI option's default.

    Attributes:
        saliency: saliency files, one per calibration domain (or give ``keep_list``).
        weights: domain name -> weight in the union (default 1 each).
        keep_list: a JSON file ``{"<layer>": [expert ids]}`` instead of saliency.
        policy: rank, keep count or share, multiple, core, coverage, top-k and budget
            (:class:`planners.policies.KeepPolicy`); with a keep list only its ``top_k`` counts.
        allow_nonuniform: accept keep sets with different counts per layer.
        allow_foreign_saliency: use saliency recorded for another model.
        max_shard_bytes: output shard size limit.
        storage_options: fsspec options for the source.
        targets, ep, fit_targets: serving engines the output must load in
            (:mod:`planners.serving`); ``fit_targets`` moves the kept count to one they accept.
        layers_only: a per-layer dry-run plan of these layers' expert tensors.
        soft: a soft prune (only router biases change).
        renormalize_topk: set ``norm_topk_prob`` in the output config, so the kept top-k
            routing weights sum to 1 (families whose router has that switch; see
            :attr:`Layout.renormalize_field`).
    """

    saliency: tuple[str, ...] = ()
    weights: Mapping[str, float] = field(default_factory=dict)
    keep_list: str | None = None
    policy: KeepPolicy = KeepPolicy()
    allow_nonuniform: bool = False
    allow_foreign_saliency: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    ep: int | None = None
    fit_targets: bool = False
    layers_only: tuple[int, ...] | None = None
    soft: bool = False
    renormalize_topk: bool = False



def plan_prune(source: str | Checkpoint, options: PlanOptions, *,
               notify: Callable[[str], None] | None = None) -> Plan:
    """Open ``source``, choose keep sets from saliency or a keep list, and build the plan.

    Args:
        source: a checkpoint URL (local path or fsspec URL), or one already opened.
        options: what to keep (:class:`PlanOptions`).
        notify: called with a note the user should see (``fit_targets`` moving the count);
            the note is also recorded in the plan's provenance.

    Raises:
        OptionError: options that conflict or do not fit the checkpoint (``option`` names the field).
        CheckpointError, SaliencyError, PolicyError, PlanError: bad input, naming the file.
    """
    with collector_paused():
        return _plan_prune(source, options, notify)


def _plan_prune(source: str | Checkpoint, options: PlanOptions, notify: Callable[[str], None] | None) -> Plan:
    _check_options(options)
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint.open(source, dict(options.storage_options))
    layout = ckpt.layout
    moe = sorted(layout.moe_layers(ckpt))
    if not moe:
        raise CheckpointError(
            f"{ckpt.url}: no MoE layer found: no tensor matches the {layout.family} expert layout "
            f"(model_type {ckpt.model_type!r}; its config may make every layer dense), so there is nothing to prune"
        )
    _check_layers(options.layers_only, moe, ckpt.url)
    policy, fit_note = _fitted_policy(ckpt, layout, options)
    if fit_note and notify:
        notify(fit_note)
    decision, prov = _decide(ckpt, layout, moe, options, policy)
    for mtp, layer in prov.get("mtp_follows", {}).items():
        if notify:
            notify(f"note: layer {mtp} is a multi-token-prediction layer with no keep set of its own "
                   f"(transformers does not run it, so no profile scores it); it took the keep set of layer {layer}")
    if fit_note:
        prov["fit_targets"] = fit_note
    layers_only = list(options.layers_only) if options.layers_only is not None else None
    plan = build_plan(ckpt, decision, max_shard_bytes=options.max_shard_bytes, layers_only=layers_only,
                      provenance=prov, soft=options.soft, renormalize=_renormalize(layout, options, notify))
    if options.targets and layers_only is None:
        plan = apply_targets(plan, layout, options.targets, options.ep)
        for v in plan.provenance["serving"]["verdicts"]:
            if v["status"] == "warn" and notify:
                notify(f"warning: {v['target']} {v['rule']}: {v['message']}")
    return plan


def _renormalize(layout: Layout, options: PlanOptions, notify: Callable[[str], None] | None) -> bool:
    """Whether ``renormalize_topk`` sets a config switch for this family (not where weights
    always sum to 1 over the top-k: gpt-oss and Mixtral take the softmax over the chosen k
    logits; a note says so)."""
    if not options.renormalize_topk:
        return False
    if layout.renormalize_field is None:
        if notify:
            notify(f"note: --renormalize-topk changes nothing for {layout.family}: its router takes the softmax "
                   f"over the chosen top-k logits, so the kept experts' weights already sum to 1")
        return False
    return True


def _check_options(options: PlanOptions) -> None:
    """Options that conflict, or that would be silently ignored."""
    if options.keep_list and options.saliency:
        raise OptionError("give --saliency or --keep-list, not both")
    if options.keep_list and options.policy.keep_outliers is not None:
        raise OptionError("--keep-outliers chooses from saliency files; a --keep-list is kept as given",
                          option="keep_outliers")
    for flag, given in (("--ep", options.ep is not None), ("--fit-targets", options.fit_targets)):
        if given and not options.targets:
            raise OptionError(f"{flag} describes how a serving engine runs the output; it needs --target "
                              f"ENGINE (vllm, sglang, trtllm, llamacpp, transformers)",
                              option=flag.lstrip("-").replace("-", "_"))
    bad = {d: w for d, w in options.weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        domain, w = next(iter(bad.items()))
        raise OptionError(f"{domain}={w}: a domain weight is a finite number >= 0", option="weights")


def _check_layers(layers: tuple[int, ...] | None, moe: list[int], src: str) -> None:
    bad = sorted(set(layers or ()) - set(moe))
    if bad:
        raise OptionError(
            f"{', '.join(map(str, bad))}: not {'an MoE layer' if len(bad) == 1 else 'MoE layers'} of {src} "
            f"(its MoE layers are {moe[0]}..{moe[-1]})" if moe else f"{src} has no MoE layers",
            option="layers_only")


def _fitted_policy(ckpt: Checkpoint, layout: Layout, options: PlanOptions) -> tuple[KeepPolicy, str | None]:
    """The keep policy, with its count moved to one every target accepts when asked to."""
    policy = options.policy
    if not (options.targets and options.fit_targets) or options.keep_list or policy.budget is not None \
            or options.soft:
        return policy, None
    facts = facts_from(ckpt.config, ((t.name, t.dtype, t.shape) for t in ckpt.tensors.values()), layout)
    return fit_policy(policy, facts, layout.num_experts(ckpt.config), layout.top_k(ckpt.config),
                      options.targets, options.ep)


def _decide(ckpt: Checkpoint, layout: Layout, moe: list[int], options: PlanOptions,
            policy: KeepPolicy) -> tuple[KeepDecision, dict[str, Any]]:
    """The keep sets and the provenance recording where they came from."""
    n_exp, top_k = layout.num_experts(ckpt.config), layout.top_k(ckpt.config)
    groups = layout.num_groups(ckpt.config)
    topk_group = ckpt.config.get("topk_group") if groups > 1 else None
    follows = mtp_followed(ckpt.config, moe)
    if options.keep_list:
        keep, digest = load_keep_list(options.keep_list, n_exp, moe, optional=tuple(follows))
        decision = validate_keep_list(_following(keep, follows), top_k, policy.top_k, options.allow_nonuniform,
                                      groups, topk_group, n_exp)
        return decision, _mtp_note(follows, keep, {"keep_list": {"path": options.keep_list, "sha256": digest},
                                                   "policy": {"top_k": policy.top_k}})
    domains = load_domains(ckpt, options, n_exp, moe, optional=tuple(follows))
    scored = [i for i in moe if i not in follows or all(i in d.saliency.layers for d in domains)]
    decision = select_keep(domains, scored, n_exp, top_k, policy, groups, topk_group)
    decision = dataclasses.replace(decision, keep=_following(decision.keep, follows))
    if not decision.uniform and not options.allow_nonuniform and policy.budget is None:
        raise OptionError("non-uniform keep counts need --allow-nonuniform")
    return decision, _mtp_note(follows, dict.fromkeys(scored), {
        "saliency": [{"path": d.saliency.source, "sha256": d.saliency.digest, "domain": d.name,
                      "weight": d.weight, "tokens": d.saliency.tokens} for d in domains],
        "policy": policy.to_json(),
    })


def _following(keep: Mapping[int, tuple[int, ...]], follows: Mapping[int, int]) -> dict[int, tuple[int, ...]]:
    """``keep`` with each MTP layer it does not choose for given the keep set of the layer it follows."""
    return dict(sorted({**{m: keep[f] for m, f in follows.items() if m not in keep}, **keep}.items()))


def _mtp_note(follows: Mapping[int, int], chosen: Mapping[int, Any], prov: dict[str, Any]) -> dict[str, Any]:
    """Provenance saying which MTP layers took another layer's keep set."""
    taken = {str(m): f for m, f in sorted(follows.items()) if m not in chosen}
    return {**prov, "mtp_follows": taken} if taken else prov


def load_domains(ckpt: Checkpoint, options: PlanOptions, n_exp: int, moe: list[int],
                 optional: tuple[int, ...] = ()) -> list[Domain]:
    """Saliency files as weighted domains, checked against the model they claim to score (the
    ``optional`` layers, MTP ones, may be left out)."""
    sal = [load_saliency(p, n_exp, moe, optional=optional) for p in options.saliency]
    identity = model_identity(ckpt) if sal else {}
    for s in sal:
        if not has_identity(s):
            log.warning("%s records no model identity (written before saliency files carried one); "
                        "cannot check it was profiled on %s", s.source, ckpt.url)
        elif not options.allow_foreign_saliency and (why := identity_mismatch(s, identity, ckpt.url)):
            raise SaliencyError(why)
    unknown = set(options.weights) - {s.domain for s in sal}
    if unknown:
        raise OptionError(f"no saliency file has domain {sorted(unknown)}", option="weights")
    return [Domain(s, options.weights.get(s.domain, 1.0)) for s in sal]
