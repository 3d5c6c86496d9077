"""``rewriter inspect``: what a checkpoint holds, from its headers alone."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from core.checkpoint import Checkpoint
from core.layouts import Layout, MoELayer, mtp_followed


def describe(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Family, geometry, bytes per expert and per-layer shard locality of the checkpoint at ``url``,
    and what its support rests on (config fields read, expert tensors classified, MTP layers).

    Reads the config, the index and each shard's header; no tensor data. A refused checkpoint
    raises :class:`~core.errors.CheckpointError` saying why, with the fields and
    expert-like tensors found.
    """
    ckpt = Checkpoint.open(url, storage_options)
    layout = ckpt.layout
    moe = layout.moe_layers(ckpt)
    counts = sorted({layer.num_experts for layer in moe.values()}) or [layout.num_experts(ckpt.config)]
    layers = []
    sizes: set[int] = set()
    for idx, layer in moe.items():
        infos = [ckpt.tensors[t.name] for t in layer.tensors]
        expert_bytes = sum(i.nbytes for i in infos)
        sizes.add(expert_bytes // layer.num_experts)
        layers.append({
            "layer": idx,
            "experts": layer.num_experts,
            "shards": sorted({i.shard for i in infos}),
            "expert_bytes": expert_bytes,
            "bytes_per_expert": expert_bytes // layer.num_experts,
        })
    per_expert = sorted(sizes)
    return {
        "url": ckpt.url,
        "status": "supported",
        "family": layout.family,
        "model_type": ckpt.model_type,
        "container": ckpt.container,
        "routing": layout.routing,
        # What support rests on: the config fields read and the expert tensors classified.
        "config_fields": {f: ckpt.config[f] for f in _fields(layout) if f in ckpt.config},
        "expert_tensors": _roles(moe.values()),
        "mtp_layers": {str(m): f for m, f in mtp_followed(ckpt.config, sorted(moe)).items()},
        "num_layers": ckpt.config.get(f"{ckpt.model_type}.block_count" if ckpt.gguf else "num_hidden_layers"),
        "moe_layers": len(moe),
        # One count, or the smallest and largest where layers keep different counts.
        "experts_per_layer": counts[0] if len(counts) == 1 else [counts[0], counts[-1]],
        "top_k": layout.top_k(ckpt.config),
        "bytes_per_expert": per_expert[0] if len(per_expert) == 1 else per_expert,
        "total_size": ckpt.total_size,
        "expert_bytes": sum(entry["expert_bytes"] for entry in layers),
        "shards": {name: s.size for name, s in ckpt.shards.items()},
        "tensors": len(ckpt.tensors),
        "other_files": ckpt.files,
        "layers": layers,
        "bytes_read": ckpt.storage.counter.bytes,
        "requests": ckpt.storage.counter.requests,
    }


def _fields(layout: Layout) -> tuple[str, ...]:
    extra = tuple(f for f in (layout.group_field, layout.renormalize_field) if f)
    return (*layout.count_fields, *layout.topk_fields, *extra, "num_hidden_layers", "num_nextn_predict_layers",
            "first_k_dense_replace", "mlp_only_layers", "decoder_sparse_step", "moe_layer_freq")


def _roles(layers: Iterable[MoELayer]) -> dict[str, int]:
    """How many tensors of each role (router, fused, per-expert) the MoE layers hold."""
    roles: dict[str, int] = {}
    for layer in layers:
        for t in layer.tensors:
            roles[t.role] = roles.get(t.role, 0) + 1
    return dict(sorted(roles.items()))


def _count_text(v: Any) -> str:
    return f"{v[0]}-{v[1]} (differs per layer)" if isinstance(v, list) else str(v)


def format_description(info: Mapping[str, Any]) -> str:
    from planners.cost import human_bytes, shard_label

    fields = ", ".join(f"{k}={v}" for k, v in info["config_fields"].items())
    roles = ", ".join(f"{n} {role}" for role, n in info["expert_tensors"].items())
    mtp = ", ".join(f"layer {m} (keep set of layer {f} unless given)" for m, f in info["mtp_layers"].items())
    lines = [
        f"checkpoint:        {info['url']}",
        f"status:            supported: family {info['family']} (model_type {info['model_type']}"
        f"{', GGUF' if info.get('container') == 'gguf' else ''})",
        f"config fields:     {fields}",
        f"expert tensors:    {roles} (every tensor of the MoE layers with an expert-sized dimension classified)",
        f"routing:           {info['routing']}",
        *([f"MTP layers:        {mtp}"] if mtp else []),
        f"layers:            {info['num_layers']} ({info['moe_layers']} MoE)",
        f"experts per layer: {_count_text(info['experts_per_layer'])}, top-k {info['top_k']}",
        f"bytes per expert:  {info['bytes_per_expert']:,} per layer" if isinstance(info['bytes_per_expert'], int)
        else f"bytes per expert:  {info['bytes_per_expert']}",
        f"tensor data:       {human_bytes(info['total_size'])} ({info['total_size']:,} B), "
        f"experts {human_bytes(info['expert_bytes'])}",
        f"shards:            {len(info['shards'])}, {info['tensors']} tensors",
        f"other files:       {', '.join(info['other_files']) or '-'}",
        "",
        "layer  experts  expert bytes  MoE tensors in shards",
    ]
    for entry in info["layers"]:
        shards = ",".join(shard_label(s) for s in entry["shards"])
        lines.append(f"{entry['layer']:>5}  {entry['experts']:>7}  {human_bytes(entry['expert_bytes']):>12}  {shards}")
    lines.append("")
    lines.append(f"read {info['bytes_read']:,} bytes in {info['requests']} requests (headers, index, config)")
    return "\n".join(lines)
