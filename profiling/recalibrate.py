"""``rewriter recalibrate``: fit the pruned model's routers to the original model's MoE outputs.

The ORIGINAL model runs layer by layer on calibration text through the layer-streamed engine
(:mod:`profiling.streamed`, the same bounded device memory as ``profile --streamed``). At every
MoE layer a forward hook on the experts module keeps, for a seeded sample of ``tokens``
positions, the MoE input (after the post-attention norm) and the original routed-experts output,
in buffers allocated on the device before the run (so the engine's activation budget counts
them). After the layer's last batch, while its weights are still on the device, that layer's
pruned router is fitted (:mod:`profiling.recal_fit`); the run then goes on with the original
layer, so every layer is fitted on the original model's inputs. Nothing is propagated backwards
between layers.

The new router rows travel with a new plan (:func:`planners.carried.carry_tensors`); layers whose
fit did not lower the held-out error keep the plain prune's rows (no new bytes).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.checkpoint import Checkpoint
from core.errors import CheckpointError, PlanError
from planners.plan import Plan
from profiling.data import LazyTokenizer, documents, pack
from profiling.observer import ExpertObserver
from profiling.profile import batched, eos_of, open_moe, tokenizer_dir
from profiling.recal_fit import FitSettings, LayerFit, PrunedLayer, fit_layer
from profiling.streamed import StreamedModel, check_device

#: model_type -> family name, for the families whose router is a plain linear layer followed by
#: softmax and top-k (in either order): the fit calls their own router module.
SUPPORTED = {"gpt_oss": "gpt-oss", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "mixtral": "Mixtral",
             "olmoe": "OLMoE"}
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
OBJECTIVE = ("held-out relative MSE between the pruned MoE layer's routed-experts output and the original "
             "layer's, per layer, on the original model's inputs")


@dataclass(frozen=True)
class RouterTensors:
    """The plan's output names (and stored dtype) of one MoE layer's router weight and bias."""

    weight: str
    bias: str | None
    dtype: torch.dtype


@dataclass(frozen=True)
class Recalibration:
    plan: Plan
    layers: tuple[LayerFit, ...]
    method: dict[str, Any]
    engine: dict[str, Any]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_plan_fits(plan: Plan, ckpt: Checkpoint) -> None:
    """Refuse, before any weight is read, what recalibration cannot do with this plan and source."""
    from planners.source_check import check_source

    where = plan.origin or "the plan"
    if plan.soft:
        raise PlanError(f"{where} is a soft prune (only router biases change, every expert stays); "
                        f"recalibrate a structural plan made by `rewriter plan`")
    if plan.is_dry_run:
        raise PlanError(f"{where} is a dry-run plan (layers {list(plan.layers_only or ())} only); recalibrate "
                        f"a whole plan made by `rewriter plan`")
    if plan.carried is not None:
        raise PlanError(f"{where} already carries new tensors ({', '.join(list(plan.carried.tensors)[:2])}...); "
                        f"recalibrate the plain plan it was made from")
    if plan.container != "safetensors":
        raise PlanError(f"{where} writes {plan.container}; recalibration writes safetensors router rows: plan "
                        f"from a safetensors checkpoint")
    model_type = ckpt.config.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"{ckpt.url}: model_type {model_type!r} ({ckpt.family}): recalibration fits "
                              f"routers that are a plain linear layer with softmax top-k ("
                              f"{', '.join(SUPPORTED.values())}); prune it without recalibrating")
    check_source(plan, ckpt)


def router_tensors(plan: Plan, engine: StreamedModel, router: torch.nn.Module, layer: int) -> RouterTensors:
    """The plan's output tensors of ``router``'s weight and bias, checked against the kept count
    and hidden size (a mismatched plan is refused before any fitting)."""
    prefix = engine.prefix[id(router)]
    by_source = {t.source: t for o in plan.outputs for t in o.tensors}
    names: list[str | None] = []
    dtype = None
    for leaf in ("weight", "bias"):
        if not isinstance(getattr(router, leaf, None), torch.nn.Parameter):
            names.append(None)
            continue
        recipe = engine.recipes.recipe(f"{prefix}.{leaf}")
        planned = by_source.get(recipe.sources[0]) if recipe.kind == "copy" and len(recipe.sources) == 1 else None
        want = (len(plan.keep[layer]), *router.weight.shape[1:]) if leaf == "weight" else (len(plan.keep[layer]),)
        if planned is None or tuple(planned.shape) != want or planned.dtype not in _DTYPES:
            found = "no such tensor" if planned is None else f"{planned.dtype} {list(planned.shape)}"
            raise PlanError(f"{plan.origin or 'the plan'}: layer {layer}'s router {leaf} should be an output "
                            f"tensor of shape {list(want)} (kept experts x hidden) in BF16, F16 or F32; found "
                            f"{found}. Make the plan again with `rewriter plan` from this source")
        names.append(planned.name)
        dtype = dtype or _DTYPES[planned.dtype]
    assert names[0] is not None and dtype is not None
    return RouterTensors(names[0], names[1], dtype)


def moe_modules(model: torch.nn.Module) -> dict[int, tuple[torch.nn.Module, torch.nn.Module]]:
    """Per MoE layer, its (router, experts) modules: the experts module of transformers' experts
    interface and, beside it, the module with a ``top_k`` and a router weight of one row per expert."""
    out = {}
    for i, experts in ExpertObserver(model).experts_modules():
        name = next(n for n, m in model.named_modules() if m is experts)
        block = model.get_submodule(name.rpartition(".")[0])
        routers = [m for m in block.children() if hasattr(m, "top_k") and isinstance(getattr(m, "weight", None),
                                                                                      torch.nn.Parameter)
                   and m.weight.shape[0] == experts.num_experts]
        if len(routers) != 1:
            raise CheckpointError(f"{type(block).__name__} of layer {i}: found {len(routers)} router modules "
                                  f"beside its experts; recalibration needs exactly one")
        out[i] = (routers[0], experts)
    return out


class Capture:
    """The sampled rows of each batch (seeded, spread over all calibration positions) and the
    buffers their MoE inputs and original outputs are copied into, layer after layer."""

    def __init__(self, batches: Sequence[np.ndarray], tokens: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, seed: int):
        sizes = [int(b.size) for b in batches]
        total = sum(sizes)
        n = min(tokens, total)
        picked = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
        starts = np.cumsum([0, *sizes])
        self.rows = [torch.as_tensor(picked[(picked >= s) & (picked < e)] - s, device=device)
                     for s, e in zip(starts[:-1], starts[1:])]
        self.total = total
        self.x = torch.empty(n, hidden, dtype=dtype, device=device)
        self.y = torch.empty_like(self.x)
        self.batch = self.filled = 0

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        rows = self.rows[self.batch]
        end = self.filled + rows.numel()
        self.x[self.filled : end] = x.reshape(-1, x.shape[-1])[rows]
        self.y[self.filled : end] = output.reshape(-1, output.shape[-1])[rows]
        self.filled, self.batch = end, self.batch + 1

    def next_layer(self) -> None:
        self.batch = self.filled = 0


def _batches(ckpt: Checkpoint, data: Sequence[str], seq_len: int, max_tokens: int | None, batch_size: int,
             work: Path) -> list[np.ndarray]:
    vocab = int(ckpt.config["vocab_size"])
    docs = documents(data, LazyTokenizer(tokenizer_dir(ckpt, work), vocab), vocab)
    try:
        return list(batched(pack(docs, seq_len, max_tokens, eos_of(ckpt.config)), batch_size))
    finally:
        docs.close()


def _run(engine: StreamedModel, batches: list[np.ndarray], modules: dict[int, tuple[torch.nn.Module, torch.nn.Module]],
         plan: Plan, names: dict[int, RouterTensors], settings: FitSettings,
         on_fit: Callable[[LayerFit, int, int], None] | None) -> tuple[list[LayerFit], int]:
    """The original model through the engine, fitting each MoE layer after its last batch."""
    hidden = int(engine.model.config.hidden_size)
    cap = Capture(batches, settings.tokens, hidden, engine.dtype, engine.device, settings.seed)
    fits: list[LayerFit] = []
    hooks = [experts.register_forward_hook(cap.hook, with_kwargs=True) for _, experts in modules.values()]

    def after(layer: int, batch: int) -> None:
        if layer not in modules or batch != len(batches) - 1:
            return
        router, experts = modules[layer]
        keep = torch.as_tensor(plan.keep[layer], device=engine.device)
        fit = fit_layer(layer, PrunedLayer(router, experts, keep, plan.top_k), cap.x, cap.y, settings,
                        names[layer].dtype)
        fits.append(fit)
        cap.next_layer()
        if on_fit is not None:
            on_fit(fit, len(fits), len(modules))

    try:
        engine.run(batches, lambda hidden_states, ids: None, on_layer=after)
    finally:
        for h in hooks:
            h.remove()
    return fits, cap.total


def _raw(t: torch.Tensor) -> bytes:
    """Little-endian bytes of ``t`` (the platforms torch runs on are little-endian)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def recalibrate(src: str, plan: Plan, data: Sequence[str], *, settings: FitSettings | None = None,
                seq_len: int = 2048, max_tokens: int | None = None, batch_size: int = 1, device: str = "cpu",
                dtype: torch.dtype | None = None, gpu_memory: int | None = None,
                storage_options: dict[str, Any] | None = None,
                on_fit: Callable[[LayerFit, int, int], None] | None = None) -> Recalibration:
    """Fit the routers of ``plan``'s pruned model (made from ``src``) on ``data``.

    Returns:
        The plan carrying the new router rows of every layer whose held-out error went down, the
        per-layer fits and the method recorded in the plan.
    """
    settings = settings or FitSettings()
    check_device(device)
    ckpt = open_moe(src, storage_options)
    try:
        check_plan_fits(plan, ckpt)
        # Batch by batch (no layer-batched MoE): the capture takes each batch's sampled rows per call.
        engine = StreamedModel(ckpt, device=device, dtype=dtype, gpu_memory=gpu_memory, expert_chunk=0)
        modules = {i: m for i, m in moe_modules(engine.model).items() if i in plan.keep}
        missing = sorted(set(plan.keep) - set(modules))
        if missing:
            raise PlanError(f"{plan.origin or 'the plan'}: layers {missing[:5]} of its expert_mapping are not MoE "
                            f"layers of {ckpt.url}; make the plan again from this source")
        names = {i: router_tensors(plan, engine, router, i) for i, (router, _) in modules.items()}
        with tempfile.TemporaryDirectory(prefix="rewriter-tok-") as work:
            batches = _batches(ckpt, data, seq_len, max_tokens, batch_size, Path(work))
        fits, total = _run(engine, batches, modules, plan, names, settings, on_fit)
        compute = str(engine.dtype).removeprefix("torch.")
    finally:
        ckpt.storage.close()
    new: dict[str, bytes] = {}
    for f in fits:
        if f.weight is not None:
            new[names[f.layer].weight] = _raw(f.weight)
        if f.bias is not None and names[f.layer].bias is not None:
            new[str(names[f.layer].bias)] = _raw(f.bias)
    method = _method(settings, data, fits, total, seq_len, batch_size, device, compute)
    from planners.carried import carry_tensors

    return Recalibration(carry_tensors(plan, new, method=method), tuple(fits), method, engine.stats.to_json())


def _method(settings: FitSettings, data: Sequence[str], fits: Sequence[LayerFit], total: int, seq_len: int,
            batch_size: int, device: str, dtype: str) -> dict[str, Any]:
    """How the new tensors were made, as the plan, pruning.json and the model card record it
    (nothing that varies between two runs of the same inputs on the same device)."""
    return {"kind": "router-recalibration", "objective": OBJECTIVE,
            "optimiser": {"name": "Adam", "lr": settings.lr, "schedule": "cosine to 0", "steps": settings.steps,
                          "batch_tokens": settings.batch_tokens, "init": "the plain prune's router rows"},
            "trained": "kept rows of the router weight and of its bias (where the family has one)",
            "tokens": {"calibration": total, "sampled_per_layer": min(settings.tokens, total),
                       "held_out_share": settings.holdout},
            "steps": settings.steps, "seed": settings.seed, "seq_len": seq_len, "batch_size": batch_size,
            "device": device, "dtype": dtype,
            "calibration_data": [{"name": Path(d).name, "sha256": file_sha256(d)} for d in data],
            "layers": {str(f.layer): {k: v for k, v in f.summary().items() if k != "seconds"} for f in fits}}
