"""Explicit keep lists: ``{"<layer>": [expert ids to keep], ...}`` (JSON), checked against the checkpoint's MoE layers."""

from __future__ import annotations

from collections.abc import Sequence

from core.errors import SaliencyError
from planners.saliency import layer_span, read_doc


def load_keep_list(path: str, num_experts: int, layers: Sequence[int],
                   optional: Sequence[int] = ()) -> tuple[dict[int, tuple[int, ...]], str]:
    """Load ``{"<layer>": [expert ids]}``; every MoE layer but the ``optional`` ones (MTP layers)
    must be present.

    Returns:
        The keep set per layer (sorted ids) and the file's sha256.
    """
    doc, digest = read_doc(path)
    if not isinstance(doc, dict):
        raise SaliencyError(f"{path}: expected an object {{\"<layer>\": [expert ids]}}")
    keep: dict[int, tuple[int, ...]] = {}
    for key, ids in doc.items():
        try:
            layer = int(key)
        except ValueError:
            raise SaliencyError(f"{path}: layer key {key!r} is not an integer") from None
        if layer not in layers:
            raise SaliencyError(f"{path}: layer {layer} is not an MoE layer of the checkpoint ({layer_span(layers)})")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise SaliencyError(f"{path}: layer {layer}: expected a list of expert ids")
        bad = [i for i in ids if not 0 <= i < num_experts]
        if bad:
            raise SaliencyError(f"{path}: layer {layer}: expert ids {bad} out of range 0..{num_experts - 1}")
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise SaliencyError(f"{path}: layer {layer}: duplicate expert ids {dup}; list each kept expert once")
        if not ids:
            raise SaliencyError(f"{path}: layer {layer}: keeps no experts")
        keep[layer] = tuple(sorted(ids))
    missing = sorted(set(layers) - set(keep) - set(optional))
    if missing:
        raise SaliencyError(f"{path}: no keep list for MoE layers {missing}")
    return keep, digest
