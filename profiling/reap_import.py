"""Import REAP observer files (``torch.save`` dicts) into the saliency format.

A REAP observer file maps each layer index to a dict of per-expert tensors. This reads
``expert_frequency`` (routed-token counts) and ``reap`` (mean of routing weight x expert output
norm); where ``reap`` is absent but ``weighted_ean_sum`` is present, REAP is that sum divided by
the frequency. Other keys (``ean_sum``, ``ean_mean``, …) are kept in the method record only by
name. EAFT-REAP is not part of REAP's observations, so imported files rank by ``freq`` or
``reap``.
"""

from __future__ import annotations

from pathlib import Path

from planners.saliency import Saliency
from rewriter.errors import SaliencyError


def _floats(v) -> list[float]:
    if hasattr(v, "detach"):
        v = v.detach().cpu().double().tolist()
    return [float(x) for x in v]


def import_reap(path: str | Path, domain: str = "reap-import", model: dict | None = None) -> Saliency:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise SaliencyError(f"{path}: file not found") from None
    if not isinstance(state, dict) or not state:
        raise SaliencyError(f"{path}: expected a dict of layer -> observations")
    layers = {}
    extra: set[str] = set()
    for key, obs in state.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise SaliencyError(f"{path}: layer key {key!r} is not an integer") from None
        if not isinstance(obs, dict) or "expert_frequency" not in obs:
            raise SaliencyError(f"{path}: layer {layer} has no 'expert_frequency'")
        freq = _floats(obs["expert_frequency"])
        if "reap" in obs:
            reap = _floats(obs["reap"])
        elif "weighted_ean_sum" in obs:
            sums = _floats(obs["weighted_ean_sum"])
            reap = [s / f if f > 0 else 0.0 for s, f in zip(sums, freq)]
        else:
            raise SaliencyError(f"{path}: layer {layer} has neither 'reap' nor 'weighted_ean_sum'")
        if len(reap) != len(freq):
            raise SaliencyError(f"{path}: layer {layer}: {len(freq)} frequencies but {len(reap)} REAP scores")
        extra |= set(obs) - {"expert_frequency", "reap", "weighted_ean_sum"}
        layers[layer] = {"freq": tuple(freq), "reap": tuple(reap)}
    n = {len(v["freq"]) for v in layers.values()}
    return Saliency(domain=domain, layers=layers, tokens=0,
                    model=model or {"num_layers": len(layers), "num_experts": max(n)},
                    method={"imported_from": str(path), "tool": "REAP observer", "other_keys": sorted(extra)})
