"""Quantization configs that name experts: rewritten for the kept experts, checked against tensors.

A quantized checkpoint's ``quantization_config`` may name modules one by one: the modules left
unquantized (compressed-tensors ``ignore``, transformers' ``modules_to_not_convert``, ModelOpt's
``exclude_modules``, bitsandbytes' ``llm_int8_skip_modules``), the modules a scheme applies to
(compressed-tensors ``config_groups.*.targets``), or per-module overrides by regex (GPTQ's
``dynamic``). Where such a name holds an expert number (``model.layers.3.mlp.experts.5.down_proj``)
pruning must drop it with its expert or renumber it with the kept one; a regex that picks some
experts of a layer by number cannot be renumbered, so it is refused. The tensors themselves move
with their expert whatever their suffixes (``weight_packed``, ``weight_scale_inv``, ``qweight`` …).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from core.checkpoint import Checkpoint
from core.errors import CheckpointError
from core.expert_layout import Layout
from core.jsonfile import parse_json_object

#: Keys of ``quantization_config`` (at any depth) whose value is a list of module names.
MODULE_LISTS = ("ignore", "modules_to_not_convert", "exclude_modules", "llm_int8_skip_modules",
                "modules_to_not_quantize", "targets")
#: Of those, the lists of modules kept unquantized.
EXCLUDING = frozenset(MODULE_LISTS) - {"targets"}
#: Keys whose value maps module regexes to overrides (GPTQ: ``+:`` / ``-:`` prefixes).
REGEX_MAPS = ("dynamic",)
#: Leaf names that only a quantized module holds.
QUANT_LEAVES = frozenset({"weight_packed", "qweight", "qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv",
                          "weight_scale_2", "weight_zero_point", "weight_global_scale", "weight_shape"})
_QUANT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "U8", "I8", "I32"})
#: Files beside config.json with a quantization config of their own (ModelOpt's export), which a
#: plan copies as they are.
SIDE_FILES = ("hf_quant_config.json",)


def _regex(entry: str, in_map: bool) -> str | None:
    """The pattern of a regex entry (``re:…`` in compressed-tensors; every GPTQ ``dynamic`` key,
    with an optional ``+:``/``-:``), ``None`` for a plain module name."""
    if entry.startswith("re:"):
        return entry[3:]
    if in_map:
        return entry[2:] if entry[:2] in ("+:", "-:") else entry
    return None


def _expert_of(layout: Layout, name: str) -> re.Match[str] | None:
    return re.search(layout.expert, name + ".") if layout.expert else None


def expert_modules(layout: Layout, tensor_names: Iterable[str]) -> dict[str, tuple[int, int, str]]:
    """Module name -> (layer, expert, its path under the expert) of every per-expert tensor."""
    out = {}
    for name in tensor_names:
        t = layout.classify(name)
        if t is None or t.role != "expert":
            continue
        module = name.rpartition(".")[0]
        m = _expert_of(layout, module)
        if m is not None:
            out[module] = (t.layer, t.expert or 0, module[m.end("expert"):])
    return out


def _check_regex(pattern: str, entry: str, where: str, modules: Mapping[str, tuple[int, int, str]],
                 counts: Mapping[int, int]) -> None:
    """Refuse a regex that matches some, not all, experts of a layer (it names them by number)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise CheckpointError(f"{where}: module regex {entry!r} does not compile ({e}); fix quantization_config") from None
    matched: dict[tuple[int, str], set[int]] = {}
    for module, (layer, expert, rest) in modules.items():
        if rx.match(module):
            matched.setdefault((layer, rest), set()).add(expert)
    for (layer, rest), experts in sorted(matched.items()):
        if len(experts) < counts.get(layer, 0):
            raise CheckpointError(
                f"{where}: {entry!r} matches experts {sorted(experts)[:8]} of layer {layer} ({rest.lstrip('.')}) but "
                f"not the others, so it picks experts by number, which pruning renumbers; replace it in "
                f"quantization_config with the module names it matches, then plan again")


def _rewrite_list(entries: list[Any], key: str, layout: Layout, keep: Mapping[int, Sequence[int]], where: str,
                  modules: Mapping[str, tuple[int, int, str]], counts: Mapping[int, int]) -> list[Any]:
    out: list[Any] = []
    for entry in entries:
        if not isinstance(entry, str):
            out.append(entry)
            continue
        pattern = _regex(entry, False)
        if pattern is not None:
            _check_regex(pattern, entry, f"{where} {key}", modules, counts)
            out.append(entry)
            continue
        m = _expert_of(layout, entry)
        if m is None or int(m.group("layer")) not in keep:
            out.append(entry)
            continue
        ids = list(keep[int(m.group("layer"))])
        expert = int(m.group("expert"))
        if expert in ids:
            a, b = m.span("expert")
            out.append(entry[:a] + str(ids.index(expert)) + entry[b:])
    return out


def _rewrite(value: Any, key: str, layout: Layout, keep: Mapping[int, Sequence[int]], where: str,
             modules: Mapping[str, tuple[int, int, str]], counts: Mapping[int, int]) -> Any:
    if isinstance(value, dict):
        if key in REGEX_MAPS:
            for k in value:
                if isinstance(k, str):
                    _check_regex(_regex(k, True) or k, k, f"{where} {key}", modules, counts)
            return value
        return {k: _rewrite(v, k, layout, keep, where, modules, counts) for k, v in value.items()}
    if isinstance(value, list) and key in MODULE_LISTS:
        return _rewrite_list(value, key, layout, keep, where, modules, counts)
    return value


def rewritten_quantization(config: Mapping[str, Any], layout: Layout, keep: Mapping[int, Sequence[int]],
                           tensor_names: Iterable[str], where: str = "config.json") -> dict[str, Any] | None:
    """The ``quantization_config`` for the kept experts, or ``None`` when it needs no change.

    Module names holding a dropped expert are removed, those of a kept expert renumbered.

    Raises:
        CheckpointError: a regex entry that picks some experts of a layer by number, or one that
            does not compile.
    """
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    # Only regex entries need every expert module (140,000 names of a 1 T checkpoint) to check.
    modules = expert_modules(layout, tensor_names) if _names_regex(q) else {}
    counts: dict[int, int] = {}
    for layer, expert, _ in modules.values():
        counts[layer] = max(counts.get(layer, 0), expert + 1)
    new = _rewrite(q, "", layout, keep, f"{where} quantization_config", modules, counts)
    return None if new == q else new


def _names_regex(value: Any, key: str = "") -> bool:
    """Whether ``value`` holds an entry that :func:`_rewrite` checks as a regex."""
    if isinstance(value, dict):
        return (key in REGEX_MAPS and bool(value)) or any(_names_regex(v, k) for k, v in value.items())
    return isinstance(value, list) and key in MODULE_LISTS and any(
        isinstance(e, str) and _regex(e, False) is not None for e in value)


def _excluded(module: str, lists: Mapping[str, list[str]]) -> bool:
    for key, entries in lists.items():
        if key not in EXCLUDING:
            continue
        for entry in entries:
            pattern = _regex(entry, False)
            if (re.match(pattern, module) is not None) if pattern is not None else (
                    module == entry or module.startswith(entry + ".")):
                return True
    return False


def _module_lists(value: Any, key: str = "") -> dict[str, list[str]]:
    """Every module list of a ``quantization_config`` by key (lists of one key concatenated)."""
    out: dict[str, list[str]] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            for kk, vv in _module_lists(v, k).items():
                out.setdefault(kk, []).extend(vv)
    elif isinstance(value, list) and key in MODULE_LISTS:
        out[key] = [e for e in value if isinstance(e, str)]
    return out


def module_list_problem(config: Mapping[str, Any], layout: Layout,
                        tensors: Iterable[tuple[str, str, Sequence[int]]]) -> str | None:
    """What is wrong between ``quantization_config``'s module lists and the per-expert tensors,
    or ``None``: an excluded expert module that does not exist or is stored quantized, or an
    expert module stored unquantized beside quantized siblings without being excluded (a loader
    would look for its quantized tensors)."""
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    leaves: dict[str, dict[str, str]] = {}
    for name, dtype, _ in tensors:
        t = layout.classify(name)
        if t is not None and t.role == "expert":
            module, _, leaf = name.rpartition(".")
            leaves.setdefault(module, {})[leaf] = dtype
    quantized = {m: bool(QUANT_LEAVES & set(ls)) or ls.get("weight") in _QUANT_DTYPES for m, ls in leaves.items()}
    lists = _module_lists(q)
    for key, entries in lists.items():
        for entry in entries:
            if key not in EXCLUDING or _regex(entry, False) is not None or _expert_of(layout, entry) is None:
                continue
            hit = [m for m in leaves if m == entry or m.startswith(entry + ".")]
            if not hit:
                return f"quantization_config {key} names {entry!r}, but the checkpoint has no such expert module"
            if any(quantized[m] for m in hit):
                return (f"quantization_config {key} names {entry!r} as not quantized, but its tensors are "
                        f"quantized ({sorted(leaves[hit[0]])})")
    siblings: dict[tuple[int, str], bool] = {}
    for m in leaves:
        e = _expert_of(layout, m)
        if e is not None:
            key2 = (int(e.group("layer")), m[e.end("expert"):])
            siblings[key2] = siblings.get(key2, False) or quantized[m]
    for m in sorted(leaves):
        e = _expert_of(layout, m)
        if e is None or quantized[m] or not siblings[(int(e.group("layer")), m[e.end("expert"):])]:
            continue
        if not _excluded(m, lists):
            return (f"expert module {m!r} is stored unquantized ({sorted(leaves[m])}) beside quantized experts, "
                    f"but quantization_config does not exclude it; a loader would look for its quantized tensors")
    return None


def check_side_files(ckpt: Checkpoint, files: Iterable[str], layout: Layout,
                     keep: Mapping[int, Sequence[int]]) -> None:
    """Refuse a copied quantization file (:data:`SIDE_FILES`) whose module lists name experts by
    number: it is copied byte for byte, so after pruning it would name the wrong experts."""
    for name in SIDE_FILES:
        if name not in files:
            continue
        where = ckpt.storage.describe(name)
        doc = parse_json_object(ckpt.storage.read_all(name), where, CheckpointError)
        if rewritten_quantization({"quantization_config": doc}, layout, keep, ckpt.tensors, where) is not None:
            raise CheckpointError(
                f"{where}: its module lists name experts by number, which pruning drops or renumbers, and this "
                f"file is copied unchanged; remove those entries (config.json's quantization_config, which is "
                f"rewritten, says the same) or the file, then plan again")
