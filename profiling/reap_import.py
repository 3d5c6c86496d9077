"""Import REAP observer files (``torch.save`` dicts) into the saliency format.

A REAP observer file maps each layer index to a dict of per-expert tensors. This reads
``expert_frequency`` (routed-token counts) and ``reap`` (mean of routing weight x expert output
norm); where ``reap`` is absent but ``weighted_ean_sum`` is present, REAP is that sum divided by
the frequency. ``total_tokens`` (tokens the layer observed) becomes the file's token count, the
largest over the layers (0 when no layer has it). Other keys (``ean_sum``, ``ean_mean``, …) are kept in the method record only by
name. EAFT-REAP is not part of REAP's observations, so imported files rank by ``freq`` or
``reap``.

Observer files are pickles, and unpickling runs code the file names; this reads them with
``torch.load(weights_only=True)``, which only rebuilds tensors, numbers, strings, lists and
dicts, so a crafted file cannot run code, and anything else is refused as "not an observer file".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from core.errors import SaliencyError, count
from planners.saliency import Saliency


def _floats(v, where: str) -> list[float]:
    try:
        if hasattr(v, "detach"):
            v = v.detach().cpu().double().reshape(-1).tolist()
        out = [float(x) for x in v]
    except (TypeError, ValueError):
        raise SaliencyError(f"{where}: expected a list or 1-D tensor of numbers, got {type(v).__name__}") from None
    bad = [i for i, x in enumerate(out) if not math.isfinite(x) or x < 0]
    if bad:
        raise SaliencyError(f"{where}: expert {bad[0]} is {out[bad[0]]}; expected a finite number >= 0. "
                            f"The observer file is damaged or from a failed run: profile again")
    return out


def _load(path: str | Path) -> dict:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SaliencyError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SaliencyError(f"{path}: is a directory; expected a REAP observer file (torch.save)") from None
    except Exception as e:  # torch raises many kinds for a file that is not a safe torch pickle
        if type(e).__name__ == "UnpicklingError":  # torch's text advises turning the safety off: not relayed
            raise SaliencyError(
                f"{path}: not a REAP observer file: it holds Python objects other than tensors, numbers, "
                f"strings, lists and dicts, so it is refused (loading them could run code); save the "
                f"observer's statistics as a dict of layer -> tensors and import that") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SaliencyError(
            f"{path}: not a REAP observer file ({type(e).__name__}: {first[:200]}); expected a torch.save "
            f"dict of layer -> observations, which is read without running code (weights_only)"
        ) from None
    if not isinstance(state, dict) or not state:
        raise SaliencyError(f"{path}: expected a dict of layer -> observations")
    return state


def _tokens(obs: dict, where: str) -> int:
    """A layer's ``total_tokens`` (a number or one-element tensor); 0 when absent."""
    if "total_tokens" not in obs:
        return 0
    v = obs["total_tokens"]
    try:
        n = float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError, RuntimeError):
        raise SaliencyError(f"{where}: total_tokens is {type(v).__name__}; expected a count") from None
    if not math.isfinite(n) or n < 0 or n != int(n):
        raise SaliencyError(f"{where}: total_tokens is {n}; expected a whole count >= 0. The observer file is "
                            f"damaged or from a failed run: profile again")
    return int(n)


def import_reap(path: str | Path, domain: str = "reap-import", model: dict | None = None,
                moe_layers: Sequence[int] | None = None) -> Saliency:
    """The saliency file of REAP observer file ``path``; with ``model`` (the identity of the checkpoint
    REAP observed) and its ``moe_layers``, the file must score exactly those layers and experts."""
    state = _load(path)
    layers = {}
    tokens = 0
    extra: set[str] = set()
    for key, obs in state.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise SaliencyError(f"{path}: layer key {key!r} is not an integer") from None
        if not isinstance(obs, dict) or "expert_frequency" not in obs:
            raise SaliencyError(f"{path}: layer {layer} has no 'expert_frequency'")
        where = f"{path}: layer {layer}"
        freq = _floats(obs["expert_frequency"], f"{where} expert_frequency")
        if "reap" in obs:
            reap = _floats(obs["reap"], f"{where} reap")
        elif "weighted_ean_sum" in obs:
            sums = _floats(obs["weighted_ean_sum"], f"{where} weighted_ean_sum")
            reap = [s / f if f > 0 else 0.0 for s, f in zip(sums, freq)]
        else:
            raise SaliencyError(f"{path}: layer {layer} has neither 'reap' nor 'weighted_ean_sum'")
        if len(reap) != len(freq):
            raise SaliencyError(f"{path}: layer {layer}: {len(freq)} frequencies but {len(reap)} REAP scores")
        tokens = max(tokens, _tokens(obs, where))
        extra |= set(obs) - {"expert_frequency", "reap", "weighted_ean_sum", "total_tokens"}
        layers[layer] = {"freq": tuple(freq), "reap": tuple(reap)}
    n = {len(v["freq"]) for v in layers.values()}
    if model is not None:
        _check_geometry(path, sorted(layers), max(n), model, moe_layers)
    return Saliency(domain=domain, layers=layers, tokens=tokens,
                    model=model or {"num_layers": len(layers), "num_experts": max(n)},
                    method={"imported_from": str(path), "tool": "REAP observer", "other_keys": sorted(extra)})


def _check_geometry(path: str | Path, layers: list[int], experts: int, model: dict, moe_layers: Sequence[int] | None) -> None:
    """SaliencyError when the observer's layers or experts per layer are not those of ``model``."""
    expected = sorted(moe_layers) if moe_layers is not None else list(range(int(model["num_layers"])))
    if layers != expected or experts != model["num_experts"]:
        raise SaliencyError(
            f"{path}: the observer scored {count(len(layers), 'layer')} ({_span(layers)}) x {experts} experts, but "
            f"--model has {count(len(expected), 'MoE layer')} ({_span(expected)}) x {model['num_experts']} experts; "
            f"pass the checkpoint REAP observed with --model (or leave --model out)")


def _span(layers: list[int]) -> str:
    return "none" if not layers else f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}..{layers[-1]}"
