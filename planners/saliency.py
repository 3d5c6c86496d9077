"""Saliency files (what the profiling step writes); keep lists are read by :mod:`planners.keep_list`.

Saliency file, version 1 (JSON)::

    {
      "format": "moe-rewriter-saliency",
      "version": 1,
      "model": {"family": "gpt_oss", "name": "openai/gpt-oss-20b",
                "num_layers": 24, "num_experts": 32, "top_k": 4,
                "fingerprint": "<sha256, see model_identity>"},
      "domain": "code",
      "tokens": 1048576,
      "method": {"seq_len": 2048, "eaft": {"p_quantile": 0.15, "h_quantile": 0.15}},
      "layers": {
        "0": {"freq": [..E ints..], "reap": [..E floats..], "eaft_reap": [..E floats..],
              "max_act": [..E floats..]},
        ...
      }
    }

``freq`` is the routed-token count, ``reap`` the mean of routing weight x expert output norm over
routed tokens, ``eaft_reap`` the correctness-weighted sum (may be negative), ``max_act`` the
largest output norm any routed token drew from the expert (optional: files written before it
existed, and REAP imports, have none; only ``--keep-outliers`` needs it). See docs/saliency.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import SaliencyError
from core.jsonfile import parse_json, read_url

if TYPE_CHECKING:
    from core.checkpoint import Checkpoint

FORMAT = "moe-rewriter-saliency"
VERSION = 1
METRICS = ("freq", "reap", "eaft_reap")
#: Per-expert fields a file may carry besides the rank metrics.
FIELDS = (*METRICS, "max_act")


@dataclass(frozen=True)
class Saliency:
    """Per-layer, per-expert scores of one calibration domain."""

    domain: str
    layers: Mapping[int, Mapping[str, tuple[float, ...]]]
    tokens: int = 0
    model: Mapping[str, Any] = field(default_factory=dict)
    method: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    digest: str = ""

    def scores(self, layer: int, metric: str) -> tuple[float, ...]:
        if metric not in METRICS:
            raise SaliencyError(f"unknown rank {metric!r}; choose one of {', '.join(METRICS)}")
        try:
            return self.layers[layer][metric]
        except KeyError:
            raise SaliencyError(
                f"{self.source or 'saliency'}: layer {layer} has no {metric!r} scores"
            ) from None

    def max_act(self, layer: int) -> tuple[float, ...] | None:
        """The layer's per-expert maximum output norms; ``None`` when the file records none."""
        return self.layers.get(layer, {}).get("max_act")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": dict(self.model),
            "domain": self.domain,
            "tokens": self.tokens,
            "method": dict(self.method),
            "layers": {str(k): {m: list(v) for m, v in d.items()} for k, d in sorted(self.layers.items())},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def read_doc(path: str) -> tuple[Any, str]:
    """The file's JSON document and the sha256 of its bytes."""
    raw = read_url(path, SaliencyError, folder="is a folder; expected a JSON file")
    return parse_json(raw, path, SaliencyError), hashlib.sha256(raw).hexdigest()


def _parse_layers(path: str, raw_layers: Any, num_experts: int | None) -> dict[int, dict[str, tuple[float, ...]]]:
    """``layer -> metric -> scores`` of a saliency file's ``layers``, each value checked."""
    if not isinstance(raw_layers, dict) or not raw_layers:
        raise SaliencyError(f"{path}: expected a non-empty \"layers\" object")
    parsed: dict[int, dict[str, tuple[float, ...]]] = {}
    for key, metrics in raw_layers.items():
        try:
            layer = int(key)
        except ValueError:
            raise SaliencyError(f"{path}: layer key {key!r} is not an integer") from None
        if not isinstance(metrics, dict):
            raise SaliencyError(f"{path}: layer {layer}: expected an object of metrics")
        parsed[layer] = {}
        for metric, values in metrics.items():
            if metric not in FIELDS:
                continue
            parsed[layer][metric] = _check_values(path, layer, metric, values, num_experts)
    return parsed


def load_saliency(path: str, num_experts: int | None = None, layers: Sequence[int] | None = None,
                  optional: Sequence[int] = ()) -> Saliency:
    """Load and validate a saliency file.

    Args:
        path: local path or fsspec URL.
        num_experts: when given, every layer must score exactly this many experts.
        layers: when given, the file must cover exactly these MoE layers, except that it may
            leave out the ``optional`` ones (multi-token-prediction layers no profile runs).

    Raises:
        SaliencyError: wrong format/version, NaN or infinite scores, negative counts or REAP,
            a layer or expert count that does not match the checkpoint.
    """
    doc, digest = read_doc(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SaliencyError(f"{path}: not a saliency file (expected \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise SaliencyError(f"{path}: saliency version {doc.get('version')!r}; this tool reads version {VERSION}")
    parsed = _parse_layers(path, doc.get("layers"), num_experts)
    if layers is not None and sorted(set(parsed) | set(optional)) != sorted(set(layers) | set(optional)):
        missing = sorted(set(layers) - set(parsed) - set(optional))
        extra = sorted(set(parsed) - set(layers))
        raise SaliencyError(
            f"{path}: saliency covers {layer_span(parsed)}, but the checkpoint's MoE layers are "
            f"{layer_span(layers)} (missing {missing or 'none'}, unexpected {extra or 'none'}); "
            f"was it profiled on another model?"
        )
    model, method, tokens = doc.get("model") or {}, doc.get("method") or {}, doc.get("tokens") or 0
    if not isinstance(model, dict) or not isinstance(method, dict):
        raise SaliencyError(f"{path}: \"model\" and \"method\" must be JSON objects")
    if "fingerprint" in model and not isinstance(model["fingerprint"], str):
        # A file with no fingerprint is an old one (warned about); a fingerprint of another type
        # is an edited one, and treating it as absent would skip the identity check.
        raise SaliencyError(f"{path}: \"model.fingerprint\" is {model['fingerprint']!r}; expected the "
                            f"sha256 string the profiler records. Restore it, or re-profile")
    if not isinstance(tokens, (int, float)) or isinstance(tokens, bool) or not 0 <= tokens < math.inf:
        raise SaliencyError(f"{path}: \"tokens\" is {tokens!r}; expected a count >= 0")
    return Saliency(
        domain=_domain(doc, path),
        layers=parsed,
        tokens=int(tokens),
        model=model,
        method=method,
        source=path,
        digest=digest,
    )


#: Characters a domain name may not hold: it is written into model-card table rows (Markdown).
_DOMAIN_FORBIDDEN = "|`<>\\"


def domain_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a calibration domain name (``None`` when it can): a domain is
    printed in model-card tables and named by ``--weight DOMAIN=W``, so it is a short string of
    printable characters without Markdown table or HTML syntax, ``=`` or outer spaces."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}; a domain name is a string"
    if not name or len(name) > 100 or name != name.strip():
        return "must be 1 to 100 characters without leading or trailing spaces"
    if not name.isprintable() or any(c in _DOMAIN_FORBIDDEN or c == "=" for c in name):
        return f"holds a control character or one of {_DOMAIN_FORBIDDEN!r} or '='; use letters, digits, '-', '_' or '.'"
    return None


def _domain(doc: Mapping[str, Any], path: str) -> str:
    name = doc["domain"] if doc.get("domain") not in (None, "") else Path(path).stem
    problem = domain_problem(name)
    if problem:
        raise SaliencyError(f"{path}: \"domain\" {name!r} {problem}; fix it in the file (or re-profile "
                            f"with a --domain of that kind)")
    return str(name)


def layer_span(layers: Any) -> str:
    ls = sorted(layers)
    if len(ls) == 1:
        return f"1 layer [{ls[0]}]"
    return f"{len(ls)} layers [{ls[0]}..{ls[-1]}]" if ls else "no layers"


def _check_values(path: str, layer: int, metric: str, values: Any, n: int | None) -> tuple[float, ...]:
    if not isinstance(values, list):
        raise SaliencyError(f"{path}: layer {layer} {metric}: expected a list of numbers")
    if n is not None and len(values) != n:
        raise SaliencyError(
            f"{path}: layer {layer} {metric} scores {len(values)} experts, but the checkpoint has "
            f"{n} experts per layer; was it profiled on another model?"
        )
    out = []
    for e, v in enumerate(values):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise SaliencyError(f"{path}: layer {layer} expert {e} {metric} is {v!r}; expected a finite number")
        if metric in ("freq", "reap", "max_act") and v < 0:
            raise SaliencyError(f"{path}: layer {layer} expert {e} {metric} is {v}; expected >= 0")
        out.append(float(v))
    return tuple(out)


#: Config fields that decide which experts exist and how tokens reach them. Names, paths,
#: dtypes of unrelated tensors and version strings are left out, so a copy, a re-shard or a
#: re-upload of the same model keeps its identity.
IDENTITY_CONFIG_FIELDS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "vocab_size", "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
    "experts_per_token", "n_group", "topk_group", "first_k_dense_replace", "norm_topk_prob",
    "n_shared_experts", "shared_expert_intermediate_size",
)


def model_identity(ckpt: Checkpoint) -> dict[str, Any]:
    """The identity a saliency file records of the model it scores.

    ``family``, ``num_layers`` (MoE layers), ``num_experts`` and ``top_k`` are for people;
    ``fingerprint`` is the sha256 of the config fields in :data:`IDENTITY_CONFIG_FIELDS` and of
    the name, dtype and shape of every expert and router tensor. It tells apart models of other
    families, geometries or layouts, not two sets of weights with the same architecture (a
    fine-tune keeps its base model's fingerprint).

    Example:
        >>> Saliency("code", layers, model=model_identity(Checkpoint.open(path)))  # doctest: +SKIP
    """
    layout = ckpt.layout
    config = ckpt.config
    infos = ckpt.tensors
    tensors: list[Any] = [(name, (info := infos[name]).dtype, list(info.shape))
                          for name in sorted(layout.classified_tensors(ckpt))]
    fields = {k: config[k] for k in IDENTITY_CONFIG_FIELDS if k in config}
    if ckpt.container == "gguf":
        # Quantizations of one model share its saliency: the architecture's hyperparameters and
        # the expert tensors' names and shapes identify it, their types do not.
        arch = f"{config.get('general.architecture')}."
        fields = {k: v for k, v in config.items() if k.startswith(arch)}
        tensors = [[name, shape] for name, _, shape in tensors]
    blob = json.dumps({"config": fields, "tensors": tensors}, sort_keys=True, separators=(",", ":"))
    # A GGUF conversion names and stores tensors its own way; experts keep their ids across it.
    container = {"container": ckpt.container} if ckpt.container != "safetensors" else {}
    return {
        **container,
        "family": layout.family,
        "model_type": config.get("model_type"),
        "num_layers": len(layout.moe_layers(ckpt)),
        "num_experts": layout.num_experts(config),
        "top_k": layout.top_k(config),
        "fingerprint": hashlib.sha256(blob.encode()).hexdigest(),
    }


def identity_mismatch(sal: Saliency, identity: Mapping[str, Any], ckpt_url: str) -> str | None:
    """Why ``sal`` was not profiled on the model of ``identity``; ``None`` when it was.

    Files without a recorded fingerprint (written before identities existed, or by hand)
    cannot be checked; :func:`has_identity` tells the caller to warn about them.
    """
    recorded = sal.model.get("fingerprint")
    if not has_identity(sal) or recorded == identity["fingerprint"]:
        return None
    theirs = {k: sal.model.get(k) for k in ("family", "num_layers", "num_experts", "top_k")}
    ours = {k: identity[k] for k in theirs}
    if sal.model.get("container", "safetensors") != identity.get("container", "safetensors") and theirs == ours:
        # Across formats (a GGUF conversion of the profiled checkpoint) tensor names, dtypes and
        # config fields differ by construction: the geometry is what can be compared.
        return None
    what = (f"it scores {_describe(theirs)}, {ckpt_url} is {_describe(ours)}" if theirs != ours
            else f"same family and geometry, but other config fields or expert tensor names, dtypes "
                 f"or shapes (fingerprint {str(recorded)[:12]} against {identity['fingerprint'][:12]})")
    return (f"{sal.source}: this saliency was profiled on another model ({what}); profile {ckpt_url}, "
            f"or pass --allow-foreign-saliency to use it anyway")


def has_identity(sal: Saliency) -> bool:
    return isinstance(sal.model.get("fingerprint"), str)


def _describe(m: Mapping[str, Any]) -> str:
    return (f"family {m['family']}, {m['num_layers']} MoE layers x {m['num_experts']} experts, "
            f"top-k {m['top_k']}")
