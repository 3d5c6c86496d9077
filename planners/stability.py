"""Keep-set stability: do two calibration samples choose the same experts?

Profile the model on two disjoint halves of the calibration data, apply one keep policy to each
saliency file, and compare the kept sets layer by layer with the Jaccard overlap
``|A and B| / |A or B|`` (1: the same experts; 0: none in common). A low overlap says the
calibration data does not decide which experts matter: more (or more varied) data is needed
before a rewrite is worth its cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from core.errors import SaliencyError
from planners.policies import Domain, KeepPolicy
from planners.saliency import Saliency, has_identity
from planners.selection import select_keep


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def check_pair(a: Saliency, b: Saliency) -> tuple[list[int], int]:
    """The shared MoE layers and expert count of two saliency files of one model.

    Raises:
        SaliencyError: files of different models (fingerprints, layers or expert counts differ).
    """
    fa, fb = a.model.get("fingerprint"), b.model.get("fingerprint")
    if has_identity(a) and has_identity(b) and fa != fb:
        raise SaliencyError(f"{a.source} and {b.source} were profiled on different models (fingerprints "
                            f"{str(fa)[:12]} and {str(fb)[:12]}); compare two profiles of one model")
    if sorted(a.layers) != sorted(b.layers):
        raise SaliencyError(f"{a.source} covers layers {sorted(a.layers)} and {b.source} layers "
                            f"{sorted(b.layers)}; compare two profiles of one model")
    counts = {len(m) for s in (a, b) for d in s.layers.values() for m in d.values()}
    if len(counts) != 1:
        raise SaliencyError(f"{a.source} and {b.source} score different numbers of experts per layer "
                            f"({sorted(counts)}); compare two profiles of one model")
    return sorted(a.layers), counts.pop()


def stability(a: Saliency, b: Saliency, policy: KeepPolicy, top_k: int | None = None) -> dict[str, Any]:
    """Per-layer Jaccard overlap of the keep sets ``policy`` chooses from ``a`` and from ``b``.

    ``top_k`` is the model's routing top-k (default: the files' record of it, else 1).
    """
    layers, n_exp = check_pair(a, b)
    recorded = a.model.get("top_k")
    k = top_k or (recorded if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0 else 1)
    keep_a = select_keep([Domain(a)], layers, n_exp, k, policy).keep
    keep_b = select_keep([Domain(b)], layers, n_exp, k, policy).keep
    rows: list[dict[str, Any]] = [{"layer": layer, "jaccard": jaccard(keep_a[layer], keep_b[layer]),
             "common": sorted(set(keep_a[layer]) & set(keep_b[layer])),
             "only_a": sorted(set(keep_a[layer]) - set(keep_b[layer])),
             "only_b": sorted(set(keep_b[layer]) - set(keep_a[layer]))} for layer in layers]
    values: list[float] = [r["jaccard"] for r in rows]
    worst = min(rows, key=lambda r: (r["jaccard"], r["layer"]))
    return {"a": a.source, "b": b.source, "rank": policy.rank, "num_experts": n_exp,
            "kept": len(keep_a[layers[0]]), "layers": rows,
            "summary": {"mean_jaccard": sum(values) / len(values), "min_jaccard": worst["jaccard"],
                        "min_layer": worst["layer"], "identical_layers": sum(1 for v in values if v == 1.0),
                        "layers": len(values)}}


def format_stability(report: dict[str, Any]) -> str:
    lines = [f"keep {report['kept']} of {report['num_experts']} experts per layer by {report['rank']}: "
             f"A = {report['a']}, B = {report['b']}",
             f"{'layer':>5}  {'jaccard':>7}  {'common':>6}  only A / only B"]
    for r in report["layers"]:
        lines.append(f"{r['layer']:>5}  {r['jaccard']:>7.3f}  {len(r['common']):>6}  {r['only_a']} / {r['only_b']}")
    s = report["summary"]
    lines.append(f"mean Jaccard {s['mean_jaccard']:.3f}, lowest {s['min_jaccard']:.3f} (layer {s['min_layer']}), "
                 f"{s['identical_layers']}/{s['layers']} layers keep the same experts")
    return "\n".join(lines)
