"""Observing MoE experts: routed-token counts, REAP sums, maximum output norms, and per-pair
contributions.

The observer registers its own experts implementation with transformers' experts interface and
switches the model to it: it computes what the eager implementation computes, only for routed
(token, expert) pairs, and on the way takes each pair's expert output norm. No dense pass over
all experts, no second computation of any expert. It serves every family whose experts module
uses that interface (gpt-oss, Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V3, GLM-4.5): the module's
own flags say whether weights are transposed, carry biases, and have a gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.errors import CheckpointError
from profiling.sections import section

IMPLEMENTATION = "rewriter_observed"


@dataclass
class LayerSlot:
    """Accumulators of one MoE layer (float64 sums on the model's device)."""

    index: int
    freq: torch.Tensor
    reap_sum: torch.Tensor
    max_norm: torch.Tensor | None = None  # largest expert output norm seen per expert
    last_ids: torch.Tensor | None = None  # [tokens, k] experts of the last forward
    last_contrib: torch.Tensor | None = None  # [tokens, k] g * ||f|| of the last forward


def _grouped_linear():
    """transformers' grouped matmul helper (one kernel for all experts), where it has one."""
    try:
        from transformers.integrations.moe import _grouped_linear as fn
    except ImportError:
        return None
    return fn


def expert_outputs(self, x: torch.Tensor, sorted_ids: torch.Tensor, counts: torch.Tensor,
                   strategy: str = "auto") -> torch.Tensor:
    """Each routed pair's expert output (before routing weights); pairs sorted by expert.

    ``grouped`` runs all experts in grouped matmuls like transformers' ``grouped_mm``
    implementation; ``loop`` runs one matmul pair per expert with tokens, like ``eager``.
    """
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    transposed = getattr(self, "is_transposed", False)
    up_w = self.gate_up_proj if has_gate else self.up_proj
    up_b = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    down_b = self.down_proj_bias if has_bias else None

    def act(h: torch.Tensor) -> torch.Tensor:
        return self._apply_gate(h) if has_gate else self.act_fn(h)

    grouped = _grouped_linear() if strategy in ("auto", "grouped") else None
    if grouped is not None:
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = grouped(x, up_w, offsets, bias=None if up_b is None else up_b[sorted_ids], is_transposed=transposed)
        return grouped(act(h), self.down_proj, offsets, bias=None if down_b is None else down_b[sorted_ids],
                       is_transposed=transposed)

    def linear(v: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = v @ w if transposed else v @ w.transpose(-2, -1)
        return y if b is None else y + b

    out = None
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        end = start + n
        h = linear(x[start:end], up_w[e], None if up_b is None else up_b[e])
        y = linear(act(h), self.down_proj[e], None if down_b is None else down_b[e])
        if out is None:
            out = torch.empty((x.shape[0], y.shape[-1]), dtype=y.dtype, device=x.device)
        out[start:end] = y
        start = end
    assert out is not None
    return out


#: ``auto`` (grouped where available), ``grouped`` or ``loop``; tests pin it.
STRATEGY = "auto"


def observed_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """Routed experts, as the eager implementation computes them, recording each pair's norm."""
    slot: LayerSlot | None = getattr(self, "_rewriter_slot", None)
    num_tokens = hidden_states.shape[0]
    k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    sorted_ids = expert_ids[order]
    counts = torch.bincount(sorted_ids, minlength=self.num_experts)
    tokens = order // k
    with section("expert_gemms"):
        out = expert_outputs(self, hidden_states[tokens], sorted_ids, counts, STRATEGY)
    g = weights[order]
    if slot is not None:
        with torch.no_grad(), section("observer"):
            norms = out.float().norm(dim=-1)
            contrib = g.float() * norms
            slot.freq += counts.to(torch.float64)
            if slot.max_norm is not None:
                slot.max_norm.scatter_reduce_(0, sorted_ids, norms.to(torch.float64), reduce="amax")
            slot.reap_sum.index_add_(0, sorted_ids, contrib.to(torch.float64))
            per_pair = torch.empty_like(contrib)
            per_pair[order] = contrib
            slot.last_ids = top_k_index.detach()
            slot.last_contrib = per_pair.view(num_tokens, k)
    weighted = out * g.unsqueeze(-1).to(out.dtype)
    result = torch.zeros_like(hidden_states)
    result.index_add_(0, tokens, weighted.to(hidden_states.dtype))
    return result


@dataclass
class ExpertObserver:
    """Installs the observed experts implementation on every MoE layer of a gpt-oss model."""

    model: torch.nn.Module
    device: torch.device | None = None  # of the accumulators; default: the model's (a skeleton's is meta)
    slots: list[LayerSlot] = field(default_factory=list)
    _previous: dict[int, str | None] = field(default_factory=dict)

    def experts_modules(self) -> list[tuple[int, torch.nn.Module]]:
        """(layer index, experts module) of every MoE layer that uses the experts interface."""
        found = []
        for name, module in self.model.named_modules():
            if not (hasattr(module, "num_experts") and hasattr(module, "down_proj") and hasattr(module, "config")):
                continue
            if not isinstance(module.down_proj, torch.nn.Parameter):
                continue
            parts = name.split(".")
            if "layers" in parts:
                found.append((int(parts[parts.index("layers") + 1]), module))
        return found

    def install(self) -> ExpertObserver:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, observed_experts_forward)
        device = self.device or next(self.model.parameters()).device
        modules = self.experts_modules()
        if not modules:
            raise CheckpointError(
                f"{type(self.model).__name__} (model_type {getattr(self.model.config, 'model_type', None)!r}): its "
                f"experts module does not use transformers' experts interface, so profile cannot observe which "
                f"tokens reach which expert; measure saliency with another tool and import it (import-reap), or "
                f"prune with a --keep-list")
        for i, experts in modules:
            n = experts.num_experts
            slot = LayerSlot(i, torch.zeros(n, dtype=torch.float64, device=device),
                             torch.zeros(n, dtype=torch.float64, device=device),
                             torch.zeros(n, dtype=torch.float64, device=device))
            experts._rewriter_slot = slot
            self._previous.setdefault(id(experts.config), getattr(experts.config, "_experts_implementation", None))
            experts.config._experts_implementation = IMPLEMENTATION
            self.slots.append(slot)
        return self

    def remove(self) -> None:
        for _, experts in self.experts_modules():
            experts.__dict__.pop("_rewriter_slot", None)
            if id(experts.config) in self._previous:
                experts.config._experts_implementation = self._previous[id(experts.config)]

    def __enter__(self) -> ExpertObserver:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()
