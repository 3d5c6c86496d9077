"""What a config says about its layers and expert counts: the MoE layers its fields make, multi-token-prediction layers, count fields that are integers or per-layer lists."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeGuard

from core.errors import CheckpointError


def configured_moe_layers(config: Mapping[str, Any]) -> tuple[str, set[int]] | None:
    """The decoder layers the config makes MoE layers, and the fields that say so; ``None`` when
    it has none of them (or no ``num_hidden_layers``).

    Read as the families' transformers code reads them: a ``moe_layers`` list (Llama-4), else
    ``mlp_layer_types`` (``"sparse"`` layers), else the dense-first fields together:
    ``first_k_dense_replace`` and ``moe_layer_freq`` (DeepSeek), ``decoder_sparse_step`` and
    ``mlp_only_layers`` (Qwen-MoE), ``num_dense_layers`` (AFMoE, LFM2), ``expert_layer_period`` and
    ``expert_layer_offset`` (Jamba).
    """
    n = config.get("num_hidden_layers")
    # An untrusted config: a layer count no model has would only make the check slow.
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= _MAX_LAYERS:
        return None
    listed = config.get("moe_layers")
    if isinstance(listed, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
        return "moe_layers", set(listed)
    types = config.get("mlp_layer_types")
    if isinstance(types, list) and len(types) == n and all(t in ("dense", "sparse") for t in types):
        return "mlp_layer_types", {i for i, t in enumerate(types) if t == "sparse"}
    rules = {
        "first_k_dense_replace": lambda i, v: i >= v, "moe_layer_freq": lambda i, v: i % v == 0,
        "decoder_sparse_step": lambda i, v: (i + 1) % v == 0, "num_dense_layers": lambda i, v: i >= v,
        "expert_layer_period": lambda i, v: i % v == config.get("expert_layer_offset", 0),
    }
    used = [f for f in rules if _is_count(config.get(f)) or (f.endswith("replace") and config.get(f) == 0)]
    only = config.get("mlp_only_layers")
    dense = set(only) if isinstance(only, list) and all(isinstance(i, int) for i in only) else set()
    if dense:
        used.append("mlp_only_layers")
    if not used:
        return None
    moe = {i for i in range(n) if all(rules[f](i, config[f]) for f in used if f in rules)}
    return ", ".join(used), moe - dense


_MAX_LAYERS = 1 << 16


def check_configured_layers(url: str, config: Mapping[str, Any], layers: Collection[int]) -> None:
    """The expert tensors sit in the layers the config makes MoE layers (MTP layers aside)."""
    said = configured_moe_layers(config)
    if said is None:
        return
    fields, want = said
    got = {i for i in layers if i < config["num_hidden_layers"]}
    if got != want:
        raise CheckpointError(
            f"{url}: config.json's {fields} make layers {_span_of(want)} MoE layers, but the expert tensors "
            f"are in layers {_span_of(got)}; transformers would build the model the config describes and not "
            f"load these tensors. Use the config written with these weights"
        )


def _span_of(layers: set[int]) -> str:
    s = sorted(layers)
    return "none" if not s else str(s) if len(s) <= 6 else f"{s[0]}..{s[-1]} ({len(s)} layers)"


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def mtp_followed(config: Mapping[str, Any], layers: Sequence[int]) -> dict[int, int]:
    """Multi-token-prediction layers among the MoE ``layers`` -> the decoder layer each follows.

    DeepSeek-V3 and GLM-4.5 checkpoints store their MTP modules (``num_nextn_predict_layers``) as
    layers ``num_hidden_layers`` and up, experts and router included. transformers does not load
    them and no profile scores them, so each takes the keep set of the last MoE decoder layer
    below it (unless a keep list or every saliency file gives its own): its experts stay the same
    count as every other layer's, which the one count field of the config requires.
    """
    n = config.get("num_hidden_layers")
    if not isinstance(n, int) or isinstance(n, bool):
        return {}
    decoder = [i for i in layers if i < n]
    return {i: max(decoder) for i in layers if i >= n and decoder}


def int_list(v: Any) -> TypeGuard[list[int]]:
    return isinstance(v, list) and bool(v) and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                   for x in v)


def int_field(config: Mapping[str, Any], fields: Sequence[str], where: str, uniform: bool = False) -> int:
    """The first of ``fields`` that is an integer, or a per-layer list of positive integers (its
    largest entry; with ``uniform``, one that holds a single value)."""
    for f in fields:
        v = config.get(f)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if int_list(v):
            if uniform and len(set(v)) > 1:
                raise CheckpointError(
                    f"{where}: {f} is a per-layer list with different counts ({sorted(set(v))[:6]}); pruning a "
                    f"source whose layers hold different expert counts is not supported (the keep sets are "
                    f"checked against one count)")
            return max(v)
    raise CheckpointError(f"{where}: expected an integer field {' or '.join(fields)} (or a per-layer list of "
                          f"positive integers)")
