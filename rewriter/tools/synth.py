"""Synthetic gpt-oss checkpoints with real tensor names, dtypes, layouts and Hugging Face sharding.

Tensor bytes are deterministic and differ per (tensor, expert row), so any slice of an output can
be traced to where it came from. BF16 values are small and finite; MXFP4 scales sit a little
below 127 so dequantized weights stay small. ``sparse=True`` writes real headers over holes: full
20B/120B geometry for the cost of the headers.

Example:
    >>> from rewriter.tools.synth import PRESETS, write_checkpoint
    >>> write_checkpoint("/tmp/tiny", PRESETS["tiny"])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# numpy loads its random generators on first use; a Ctrl-C that lands while that extension
# initialises is swallowed by it. Loaded here, with this module, it cannot fall in the middle of
# writing a shard, where an interrupt must stop the command.
import numpy.random  # noqa: F401

from core.format import encode_header, nbytes_of, reference_order
from rewriter.tools import synth_moe
from rewriter.tools.synth_data import Values, tensor_chunks
from rewriter.tools.synth_moe import MOE_PRESETS, MoEGeometry

#: Suffix of a shard being written; renamed to its name once whole.
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class Geometry:
    """Shape of a synthetic gpt-oss model and how it is sharded.

    ``max_shard_bytes`` is the greedy fill limit over tensor data in index order; shard names are
    zero-based (``model-00000-of-00002``) like the gpt-oss repos.
    """

    num_layers: int
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    vocab: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_shard_bytes: int
    quant: str = "mxfp4"  # or "bf16"

    def with_layers(self, n: int) -> Geometry:
        return dataclasses.replace(self, num_layers=n)


PRESETS: dict[str, Geometry] = {
    "20b": Geometry(24, 32, 4, 2880, 2880, 201088, 64, 8, 64, 4_800_000_000),
    "120b": Geometry(36, 128, 4, 2880, 2880, 201088, 64, 8, 64, 4_800_000_000),
    # Small enough for unit tests, loadable by transformers, several shards.
    "tiny": Geometry(2, 8, 2, 64, 64, 256, 4, 2, 16, 90_000),
    "tiny-bf16": Geometry(2, 8, 2, 64, 64, 256, 4, 2, 16, 200_000, quant="bf16"),
    # Benchmarks: a few MB per layer, many experts.
    "small": Geometry(4, 32, 4, 512, 512, 4096, 8, 2, 64, 20_000_000),
}


def layer_tensors(g: Geometry, layer: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """One decoder layer's tensors in the gpt-oss index order."""
    p = f"model.layers.{layer}."
    E, H, inter = g.num_experts, g.hidden, g.intermediate
    q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    out = [
        (p + "input_layernorm.weight", "BF16", (H,)),
        (p + "self_attn.o_proj.bias", "BF16", (H,)),
        (p + "self_attn.o_proj.weight", "BF16", (H, q)),
        (p + "self_attn.q_proj.bias", "BF16", (q,)),
        (p + "self_attn.k_proj.bias", "BF16", (kv,)),
        (p + "self_attn.v_proj.bias", "BF16", (kv,)),
        (p + "self_attn.q_proj.weight", "BF16", (q, H)),
        (p + "self_attn.k_proj.weight", "BF16", (kv, H)),
        (p + "self_attn.v_proj.weight", "BF16", (kv, H)),
        (p + "self_attn.sinks", "BF16", (g.num_heads,)),
        (p + "mlp.router.bias", "BF16", (E,)),
        (p + "mlp.router.weight", "BF16", (E, H)),
    ]
    x = p + "mlp.experts."
    if g.quant == "mxfp4":
        out += [
            (x + "gate_up_proj_bias", "BF16", (E, 2 * inter)),
            (x + "gate_up_proj_blocks", "U8", (E, 2 * inter, H // 32, 16)),
            (x + "gate_up_proj_scales", "U8", (E, 2 * inter, H // 32)),
            (x + "down_proj_bias", "BF16", (E, H)),
            (x + "down_proj_blocks", "U8", (E, H, inter // 32, 16)),
            (x + "down_proj_scales", "U8", (E, H, inter // 32)),
        ]
    else:
        out += [
            (x + "gate_up_proj", "BF16", (E, H, 2 * inter)),
            (x + "gate_up_proj_bias", "BF16", (E, 2 * inter)),
            (x + "down_proj", "BF16", (E, inter, H)),
            (x + "down_proj_bias", "BF16", (E, H)),
        ]
    out.append((p + "post_attention_layernorm.weight", "BF16", (H,)))
    return out


def all_tensors(g: Geometry | MoEGeometry) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every tensor in index order: layers sorted as strings, then embed, norm, lm_head."""
    if isinstance(g, MoEGeometry):
        return synth_moe.all_tensors(g)
    out = []
    for layer in sorted(range(g.num_layers), key=str):
        out += layer_tensors(g, layer)
    out += [
        ("model.embed_tokens.weight", "BF16", (g.vocab, g.hidden)),
        ("model.norm.weight", "BF16", (g.hidden,)),
        ("lm_head.weight", "BF16", (g.vocab, g.hidden)),
    ]
    return out


def shard_assignment(g: Geometry | MoEGeometry) -> dict[str, list[tuple[str, str, tuple[int, ...]]]]:
    """Greedy fill in index order into shards of at most ``max_shard_bytes`` of tensor data."""
    if isinstance(g, MoEGeometry):
        return synth_moe.shard_assignment(g)
    groups = synth_moe.fill_shards(all_tensors(g), g.max_shard_bytes)
    last = len(groups) - 1
    return {f"model-{i:05d}-of-{last:05d}.safetensors": grp for i, grp in enumerate(groups)}


def config_for(g: Geometry | MoEGeometry) -> dict:
    """A gpt-oss ``config.json`` for the geometry (the 20B config with its sizes replaced)."""
    if isinstance(g, MoEGeometry):
        return synth_moe.config_for(g)
    cfg = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": min(200002, g.vocab - 1),
        "experts_per_token": g.top_k,
        "head_dim": g.head_dim,
        "hidden_act": "silu",
        "hidden_size": g.hidden,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": g.intermediate,
        "layer_types": [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(g.num_layers)
        ],
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": g.num_heads,
        "num_experts_per_tok": g.top_k,
        "num_hidden_layers": g.num_layers,
        "num_key_value_heads": g.num_kv_heads,
        "num_local_experts": g.num_experts,
        "output_router_logits": False,
        "pad_token_id": min(199999, g.vocab - 2),
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": g.vocab,
    }
    if g.quant == "mxfp4":
        cfg["quantization_config"] = {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        }
    return cfg


def write_shard(path: Path, items: list[tuple[str, str, tuple[int, ...]]], sparse: bool = False,
                progress: Callable[[int], None] | None = None, values: Values | None = None) -> None:
    """Write one shard in the reference writer's order; holes instead of data when ``sparse``;
    bytes from ``values`` (default :func:`tensor_chunks`).

    ``progress`` is called with the number of bytes of each chunk of tensor data written.
    """
    ordered = reference_order(items)
    head = encode_header(ordered, {"format": "pt"})
    total = len(head) + sum(nbytes_of(d, s) for _, d, s in ordered)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.unlink(missing_ok=True)  # a fresh file, whatever a left-over one is a link of
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            if sparse:
                f.truncate(total)
            else:
                for name, dtype, shape in ordered:
                    for chunk in (values or tensor_chunks)(name, dtype, shape):
                        f.write(chunk)
                        if progress:
                            progress(len(chunk))
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: leave no half-written shard behind
        tmp.unlink(missing_ok=True)
        raise


def holds_only_temporaries(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds nothing but shards a killed ``synth`` left half-written."""
    return all(name.endswith(".safetensors" + TMP_SUFFIX) for name in os.listdir(folder))


def write_checkpoint(out: str | os.PathLike, g: Geometry | MoEGeometry, sparse: bool = False,
                     progress: Callable[[int], None] | None = None, values: Values | None = None) -> dict:
    """Write a synthetic checkpoint (shards, index, config, tokenizer stub) to directory ``out``.

    ``progress`` is called with each number of tensor bytes written (never when ``sparse``).
    ``values=computing_chunks`` writes weights that compute (for profiling and evaluating
    real-geometry models without downloads); the default traces bytes.

    Returns:
        The index document written (``metadata.total_size`` and ``weight_map``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = shard_assignment(g)
    weight_map = {}
    total = 0
    for shard, items in shards.items():
        write_shard(out / shard, items, sparse=sparse, progress=progress, values=values)
        for name, dtype, shape in items:
            weight_map[name] = shard
            total += nbytes_of(dtype, shape)
    # Index order: the order tensors were assigned, as in the gpt-oss repos.
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _replace_text(out / "config.json", json.dumps(config_for(g), indent=2) + "\n")
    _replace_text(out / "generation_config.json",
                  json.dumps({"bos_token_id": 0, "eos_token_id": config_for(g)["eos_token_id"]}, indent=2) + "\n")
    _replace_text(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return index


def _replace_text(path: Path, text: str) -> None:
    """Write ``path`` under a new name, then rename it into place: a file already there (with
    --force) is replaced, never written into, so another checkpoint it is a hard link of keeps it."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    tmp.write_text(text)
    os.replace(tmp, path)


def preset(name: str, layers: int | None = None) -> Geometry | MoEGeometry:
    """A preset by name (gpt-oss ones and :data:`synth_moe.MOE_PRESETS`), with ``layers`` layers."""
    known: dict[str, Geometry | MoEGeometry] = {**PRESETS, **MOE_PRESETS}
    if name not in known:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(known)}")
    if layers is not None and layers < 1:
        raise ValueError(f"--layers {layers}: a checkpoint needs at least 1 layer")
    g = known[name]
    return g.with_layers(layers) if layers is not None else g


def synthetic_saliency(num_layers: int, num_experts: int, top_k: int, domain: str = "synthetic",
                       seed: int = 0, tokens: int = 65536, model: dict | None = None):
    """Plausible, deterministic saliency scores (heavy-tailed routing) for planning tests and demos.

    ``model`` is the identity to record (``planners.saliency.model_identity``); without it the
    file records a gpt-oss geometry and no fingerprint.

    Returns:
        A :class:`planners.saliency.Saliency`.
    """
    from planners.saliency import Saliency

    rng = np.random.default_rng(seed)
    # Its own stream, so the other scores are those of files written before max_act existed.
    rng_act = np.random.default_rng([seed, 1])
    layers = {}
    for layer in range(num_layers):
        share = rng.dirichlet(np.full(num_experts, 0.7))
        freq = np.floor(share * tokens * top_k).astype(int)
        norm = rng.uniform(0.5, 2.0, num_experts)
        gate = rng.uniform(0.1, 0.5, num_experts)
        reap = np.where(freq > 0, gate * norm, 0.0)
        eaft = freq * reap * rng.uniform(0.2, 1.0, num_experts) - rng.uniform(0, 0.1, num_experts) * freq
        # Largest output norms: around the typical norm, with now and then a "super" expert far out.
        act = norm * rng_act.lognormal(1.0, 0.3, num_experts)
        act[rng_act.random(num_experts) < 2.0 / num_experts] *= 8.0
        layers[layer] = {"freq": tuple(float(x) for x in freq), "reap": tuple(float(x) for x in reap),
                         "eaft_reap": tuple(float(x) for x in eaft), "max_act": tuple(float(x) for x in act)}
    return Saliency(domain=domain, layers=layers, tokens=tokens,
                    model=model or {"family": "gpt_oss", "num_layers": num_layers, "num_experts": num_experts,
                                    "top_k": top_k},
                    method={"generator": "rewriter.synth.synthetic_saliency", "seed": seed})
