"""Fitting one pruned MoE layer's router so that its output matches the original layer's.

Given tokens' MoE inputs ``x`` and the original layer's routed-experts output ``y`` (all experts,
original routing), the pruned layer computes ``ŷ(x) = Σ_j g_j(x; W, b) f_j(x)`` over the top-k of
the kept experts, with the family's own routing function (the router module is called with the
kept rows as its parameters) and the kept experts' real weights. Only ``W`` (the kept rows of the
router weight) and ``b`` (its bias, where the family has one) change; they minimise
``mean ||ŷ - y||² / mean ||y||²`` with Adam over minibatches of tokens, from the plain prune's rows.

Top-k selection is not differentiable: gradients reach the selected experts' routing weights
(and, for families that softmax over every expert before the top-k, the others' logits through
the denominator), so the selection moves only as a consequence of the logits the weights move.
The experts' outputs are computed without gradients: expert weights never change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from profiling.observer import STRATEGY, expert_outputs

#: Checkpoints of a fit compared on validation tokens (one after every fifth of the steps).
CHECKPOINTS = 5


@dataclass(frozen=True)
class FitSettings:
    """The knobs of the fit (defaults documented in docs/recalibration.md)."""

    tokens: int = 65536  # sampled per MoE layer, training and held-out together
    steps: int = 200
    lr: float = 1e-2  # Adam's step size, relative to the root-mean-square of the layer's router weight
    batch_tokens: int = 4096
    holdout: float = 0.125  # share of the sampled tokens kept out of training: validation and test halves
    seed: int = 0


@dataclass(frozen=True)
class LayerFit:
    """One layer's result; ``weight``/``bias`` are the kept rows in the router's own dtype on the
    CPU, or ``None`` when the fit was not kept (the plain prune's rows stay)."""

    layer: int
    mse_before: float  # on the test tokens, relative to the original output's energy
    mse_after: float
    accepted: bool
    train_tokens: int
    held_out_tokens: int
    seconds: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def summary(self) -> dict[str, float | int | bool]:
        return {"mse_before": self.mse_before, "mse_after": self.mse_after, "accepted": self.accepted,
                "train_tokens": self.train_tokens, "held_out_tokens": self.held_out_tokens,
                "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class PrunedLayer:
    """What the pruned layer computes with: the loaded router and experts modules, the kept
    original expert ids (new id ``j`` is ``keep[j]``) and the pruned model's top-k."""

    router: torch.nn.Module
    experts: torch.nn.Module
    keep: torch.Tensor
    top_k: int

    def params(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The plain prune's router parameters (kept rows) in ``dtype``, detached."""
        out = {"weight": self.router.weight.detach()[self.keep].to(dtype).clone()}
        bias = getattr(self.router, "bias", None)
        if isinstance(bias, torch.Tensor):
            out["bias"] = bias.detach()[self.keep].to(dtype).clone()
        return out

    def output(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The pruned layer's routed-experts output for ``x`` ([N, H]), in float32; differentiable
        in ``params`` through the routing weights."""
        previous = self.router.top_k
        self.router.top_k = self.top_k
        try:
            dtype = params["weight"].dtype
            _, scores, idx = torch.func.functional_call(self.router, params, (x.to(dtype),))
        finally:
            self.router.top_k = previous
        ids = self.keep[idx].reshape(-1)
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        counts = torch.bincount(sorted_ids, minlength=self.experts.num_experts)
        tokens = order // idx.shape[-1]
        with torch.no_grad():
            out = expert_outputs(self.experts, x[tokens], sorted_ids, counts, STRATEGY).float()
        g = scores.reshape(-1)[order].float()
        y = torch.zeros(x.shape[0], out.shape[-1], dtype=torch.float32, device=x.device)
        return y.index_add(0, tokens, out * g.unsqueeze(-1))


def relative_mse(layer: PrunedLayer, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 chunk: int) -> float:
    """``Σ ||ŷ - y||² / Σ ||y||²`` over all rows, ``chunk`` rows at a time."""
    err = energy = 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            target = y[s : s + chunk].float()
            err += float(((layer.output(params, x[s : s + chunk]) - target) ** 2).sum())
            energy += float((target**2).sum())
    return err / max(energy, 1e-30)


def split(n: int, holdout: float, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training, validation and test row indices of ``n`` sampled tokens (seeded): ``holdout`` of
    them held out, half to choose among the fit's checkpoints, half to judge the chosen one."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = min(n - 2, max(2, round(n * holdout)))
    val = held // 2
    parts = perm[held:], perm[:val], perm[val:held]
    return tuple(p.sort().values.to(device) for p in parts)  # type: ignore[return-value]


def fit_layer(index: int, layer: PrunedLayer, x: torch.Tensor, y: torch.Tensor, settings: FitSettings,
              stored: torch.dtype) -> LayerFit:
    """Fit ``layer``'s kept router rows (and bias) to ``y`` on ``x``.

    Checkpoints of the fit (every fifth of the steps, rounded to ``stored``, the dtype the router
    is written in) are compared on validation tokens with the plain prune; the best one is kept
    only if it also lowers the error on the test tokens, which no choice has seen. The reported
    errors are the test tokens'.
    """
    t0 = time.perf_counter()
    train, val, test = split(x.shape[0], settings.holdout, settings.seed + index, x.device)
    compute = layer.router.weight.dtype
    plain = layer.params(compute)
    chunk = settings.batch_tokens
    best, best_val = plain, relative_mse(layer, plain, x[val], y[val], chunk)
    for params in _adam(layer, x[train], y[train], settings, index):
        # A copy: ``.to`` of the same dtype returns the live tensor, which the next steps change.
        rounded = {k: v.detach().to(stored).to(compute).clone() for k, v in params.items()}
        err = relative_mse(layer, rounded, x[val], y[val], chunk)
        if err < best_val:
            best, best_val = rounded, err
    before = relative_mse(layer, plain, x[test], y[test], chunk)
    after = relative_mse(layer, best, x[test], y[test], chunk) if best is not plain else before
    accepted = after < before
    out = {k: v.to(stored).cpu() for k, v in best.items()} if accepted else {}
    return LayerFit(index, before, after if accepted else before, accepted, int(train.numel()),
                    int(val.numel() + test.numel()), time.perf_counter() - t0, out.get("weight"), out.get("bias"))


def _adam(layer: PrunedLayer, x: torch.Tensor, y: torch.Tensor, settings: FitSettings,
          index: int) -> Iterator[dict[str, torch.Tensor]]:
    """Adam on float32 copies of the kept rows, cosine-decayed learning rate, minibatches of
    ``batch_tokens`` rows drawn without replacement (seeded); yields the parameters after every
    fifth of the steps.

    The step size is ``lr`` times the router weight's RMS, so one setting suits routers of any
    scale (a router's logits scale with its weights)."""
    if settings.steps == 0:
        return
    params = {k: v.float().requires_grad_(True) for k, v in layer.params(torch.float32).items()}
    scale = float(params["weight"].detach().pow(2).mean().sqrt().clamp_min(1e-8))
    opt = torch.optim.Adam(list(params.values()), lr=settings.lr * scale)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / settings.steps)))
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
    n, bt = x.shape[0], min(settings.batch_tokens, x.shape[0])
    energy = float((y.float() ** 2).sum(-1).mean().clamp_min(1e-30))
    every = max(1, settings.steps // CHECKPOINTS)
    order, pos = torch.randperm(n, generator=gen), 0
    for step in range(1, settings.steps + 1):
        if pos + bt > n:
            order, pos = torch.randperm(n, generator=gen), 0
        rows = order[pos : pos + bt].to(x.device)
        pos += bt
        with torch.enable_grad():
            pred = layer.output(params, x[rows])
            loss = ((pred - y[rows].float()) ** 2).sum(-1).mean() / energy
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sched.step()
        if step % every == 0 or step == settings.steps:
            yield params
