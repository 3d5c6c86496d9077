"""The layer-streamed engine: run a model larger than the device, one decoder layer at a time.

The model is a skeleton on the meta device. Every batch is first embedded, and the model's own
forward records what it passes each decoder layer (attention masks, rotary embeddings, position
ids: whatever that family and transformers version use, sliding-window layers included) while
each layer is replaced by a recorder that returns its input. Then, layer by layer, only that
layer's tensors are read through the storage layer (a reader thread fetches the next layer while
the current one computes), put on the device, dequantized there, and every batch's hidden states
go through it with what its recorder kept. The final norm and ``lm_head`` come last.

Hidden states of all tokens stay on the device within an activation budget; the rest live in
(pinned) host memory, one tensor per batch. The device holds about two layers of weights plus
that budget, whatever the number of layers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from core.checkpoint import Checkpoint
from core.errors import (
    DeviceError,
    DeviceMemoryError,
    RewriterError,
    is_out_of_memory,
    out_of_memory,
)
from profiling import deferred
from profiling.activations import ActivationStore
from profiling.sections import section
from profiling.weights import Recipes, build, checkpoint_dtype, dense_bytes, fp8_block, read_tensors

log = logging.getLogger(__name__)
GiB = 1 << 30
#: Device memory kept free for kernels' workspace and allocator slack when sizing the budget.
WORKSPACE = 2 * GiB
#: Tokens per chunk when computing logits from the final hidden states.
HEAD_CHUNK = 2048
#: What to lower when memory runs out, by what the engine was doing: building a layer's weights
#: needs the layer's own size (no option shrinks it); running a batch, room for hidden states.
_REMEDY = {
    "load": "a decoder layer's weights are built on the device whole, so free the device (nvidia-smi lists "
            "the processes holding it; a limit of --gpu-memory below the layer's size is too tight) or use "
            "a device with more memory",
    "read": "the next layer's weights are read ahead into host memory: free host memory or run fewer "
            "processes (--devices) at once",
    "run": "lower --gpu-memory so more hidden states stay in host memory, or lower --batch-size, "
           "--expert-chunk or --seq-len",
    "run, batch by batch": "lower --gpu-memory so more hidden states stay in host memory, or lower "
                           "--batch-size or --seq-len",
}


@dataclass
class LayerTiming:
    """Seconds spent on one decoder layer: reading (reader thread), waiting for the read,
    moving to the device and dequantizing, and computing every batch."""

    layer: int
    read_s: float = 0.0
    wait_s: float = 0.0
    load_s: float = 0.0
    compute_s: float = 0.0
    raw_bytes: int = 0
    weight_bytes: int = 0


@dataclass
class EngineStats:
    """What a streamed run measured."""

    layers: list[LayerTiming] = field(default_factory=list)
    embed_s: float = 0.0
    head_s: float = 0.0
    total_s: float = 0.0
    peak_weight_bytes: int = 0  # layer weights held at once: raw bytes read ahead + built parameters
    activation_bytes: int = 0
    activations_on_device: int = 0
    activation_budget: int = 0
    expert_chunk: int = 0  # tokens per layer-batched MoE forward; 0: batch by batch
    batched_layers: int = 0  # layers whose MoE ran over chunks of batches
    peak_device_bytes: int | None = None
    attention: str = ""  # transformers' attention implementation the layers ran

    def to_json(self) -> dict[str, Any]:
        return {k: ([vars(t) for t in v] if k == "layers" else v) for k, v in vars(self).items()}


class WeightLedger:
    """Bytes of layer weights alive (read ahead or built), and their peak; thread-safe (the
    reader thread adds what it reads)."""

    def __init__(self) -> None:
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.held += n
            self.peak = max(self.peak, self.held)

    def drop(self, n: int) -> None:
        with self._lock:
            self.held -= n


class _Stop(Exception):
    """Ends the recording forward once the last recorder has run."""


def fits(ckpt: Checkpoint, dtype: torch.dtype, device: str, gpu_memory: int | None) -> tuple[bool, int, int]:
    """Whether the whole model (dequantized to ``dtype``) fits ``device``.

    Returns:
        (fits, bytes the weights need, bytes available: ``gpu_memory`` or free memory, with a
        fifth kept for activations).
    """
    need = dense_bytes(ckpt, dtype)
    if gpu_memory is not None:
        free = gpu_memory
    elif device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return need <= 0.8 * free, need, free


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB // 10 else f"{n / (1 << 20):.1f} MiB"


def check_layer_room(layer: int, layer_bytes: int, free: int, device: str, dtype: torch.dtype, capped: bool) -> None:
    """Refuse, before any weight is read, a decoder layer whose weights alone (and the kernels'
    workspace) exceed the device memory there is: ``free`` bytes, within --gpu-memory when
    ``capped``. Every layer is built whole on the device, so no smaller batch makes it fit."""
    if layer_bytes + WORKSPACE <= free:
        return
    where = "are left within --gpu-memory" if capped else (
        "are free on it (other processes may hold the rest: nvidia-smi lists them)")
    raise DeviceMemoryError(
        f"{device}: decoder layer {layer}'s weights need {layer_bytes / GiB:.1f} GiB as "
        f"{str(dtype).removeprefix('torch.')} plus {WORKSPACE // GiB} GiB of workspace, and {free / GiB:.1f} GiB "
        f"{where}; the streamed engine builds one whole layer at a time on the device: "
        f"{'raise --gpu-memory, ' if capped else ''}free the device or use one with more memory")


def check_device(device: str) -> None:
    """A clear error for a device torch cannot use, before anything is loaded."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; "
                          f"use --device cpu, or install a CUDA build of torch on a machine with a GPU")
    if device != "cpu" and not device.startswith("cuda"):
        raise DeviceError(f"--device {device}: expected cpu or cuda[:N]")


#: Environment variable naming the attention implementation to run models with: ``auto`` (the
#: default: :func:`attention_for`), ``default`` (transformers' own choice), or a name transformers
#: knows (``eager``, ``sdpa``, ``flex_attention``).
ATTENTION_ENV = "REWRITER_ATTENTION"


def attention_for(model_cls: type, device: torch.device) -> str | None:
    """The attention implementation to run ``model_cls`` with on ``device`` (None: transformers'
    default). Automatically: the default, except where that is the eager one (no SDPA, as for
    gpt-oss's attention sinks) and the model supports flex attention on a CUDA device, which runs
    sinks and sliding windows in fused kernels instead of materializing every score matrix in
    float32. ``REWRITER_ATTENTION`` overrides the choice."""
    import os

    chosen = os.environ.get(ATTENTION_ENV, "auto").strip() or "auto"
    if chosen == "default":
        return None
    if chosen != "auto":
        return chosen
    if device.type == "cuda" and not getattr(model_cls, "_supports_sdpa", False) \
            and getattr(model_cls, "_supports_flex_attn", False):
        return "flex_attention"
    return None


def set_attention(model: Any, device: torch.device, source: str) -> None:
    """Run ``model`` with :func:`attention_for` its class and ``device``; a choice the model
    cannot run is one clear error naming ``source``."""
    chosen = attention_for(type(model), device)
    if not chosen or chosen == model.config._attn_implementation:
        return
    if chosen == "flex_attention" and device.type != "cuda" and any(
            isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules()):
        raise RewriterError(f"{source}: cannot run attention 'flex_attention' ({ATTENTION_ENV}) on {device.type}: "
                            f"transformers runs this model's attention sinks with flex attention only on CUDA; "
                            f"unset {ATTENTION_ENV} or set it to eager")
    try:
        model.set_attn_implementation(chosen)
    except (ValueError, ImportError) as e:
        raise RewriterError(f"{source}: cannot run attention {chosen!r} ({ATTENTION_ENV}): {e}") from e


def skeleton(config: dict[str, Any], dtype: torch.dtype):
    """The causal LM of ``config`` on the meta device (no memory, no initialization)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "transformers_version")}
    model_type = cfg.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise RewriterError(f"config.json: model_type {model_type!r} is not known to this transformers")
    cls = CONFIG_MAPPING[model_type]
    decode = getattr(cls, "_decode_special_floats", None)  # {"__float__": "Infinity"}, as transformers writes it
    conf = cls(**(decode(cfg) if decode else cfg))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def fp32_patterns(model, dtype: torch.dtype) -> list[str]:
    """Parameters transformers keeps in float32 when loading in ``dtype`` (its dtype plan)."""
    out: list[str] = []
    if dtype in (torch.float16, torch.bfloat16):
        out += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        out += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return out


class StreamedModel:
    """A checkpoint run layer by layer on one device.

    Args:
        ckpt: the opened checkpoint (headers only are read until :meth:`run`).
        device: ``cpu`` or ``cuda[:N]``.
        dtype: compute dtype (default: the checkpoint's own).
        gpu_memory: bytes of device memory to stay within (activations beyond the budget go to
            host memory); on CUDA it also caps torch's allocator.
        expert_chunk: tokens the MoE of a layer takes at once, over the batches that fit
            (:mod:`profiling.deferred`); None: as many as the memory budget allows; 0: batch
            by batch, the MoE inside each layer call.
    """

    def __init__(self, ckpt: Checkpoint, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 gpu_memory: int | None = None, expert_chunk: int | None = None):
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.dtype = dtype or checkpoint_dtype(ckpt)
        self.gpu_memory = gpu_memory
        self.expert_chunk = expert_chunk
        self.model = skeleton(ckpt.config, self.dtype)
        set_attention(self.model, self.device, ckpt.url)
        self.base = self.model.base_model
        self.recipes = Recipes(ckpt, self.dtype, fp32_patterns(self.model, self.dtype), self.model)
        self.block = fp8_block(ckpt.config)
        self.prefix = {id(m): name for name, m in self.model.named_modules()}
        self.ledger = WeightLedger()
        self.stats = EngineStats()
        self.doing = ("run", "")  # (kind of work, what) for an out-of-memory error's message
        self._pin = self.device.type == "cuda"
        self._rotary()

    def _rotary(self) -> None:
        """Rotary buffers are computed, not stored: rebuild them as transformers does (on the CPU,
        then moved), so they are bit-identical to a normally loaded model's."""
        rot = getattr(self.base, "rotary_emb", None)
        if rot is not None:
            self.base.rotary_emb = type(rot)(config=self.model.config).to(self.device)
        # Families with one rotary embedding per layer kind or theta keep them in a list, each
        # built from its own config.
        for name, module in list(self.base.named_modules()):
            if not name or name.startswith("layers.") or name == "rotary_emb" or "Rotary" not in type(module).__name__:
                continue
            parent, _, leaf = name.rpartition(".")
            owner = self.base.get_submodule(parent) if parent else self.base
            setattr(owner, leaf, type(module)(getattr(module, "config", self.model.config)).to(self.device))

    # --- weights -----------------------------------------------------------------------------

    def _keys(self, module: torch.nn.Module) -> list[str]:
        persistent = list(module.state_dict().keys())
        buffers = {n for n, _ in module.named_buffers()}
        missing = buffers - set(persistent)
        if missing:
            raise RewriterError(f"{type(module).__name__} has computed buffers {sorted(missing)} that the "
                                f"streamed engine cannot restore; run without --streamed")
        return persistent

    def plan(self, module: torch.nn.Module) -> list:
        prefix = self.prefix[id(module)]
        return [self.recipes.recipe(f"{prefix}.{k}") for k in self._keys(module)]

    def read(self, module: torch.nn.Module) -> tuple[list, dict[str, torch.Tensor], float]:
        """Read ``module``'s tensors (the reader thread runs this); the ledger counts them until
        the caller drops them."""
        t0 = time.perf_counter()
        recipes = self.plan(module)
        stored = read_tensors(self.ckpt.storage, self.recipes.sources(recipes), pin=self._pin)
        self.ledger.add(sum(t.nbytes for t in stored.values()))
        return recipes, stored, time.perf_counter() - t0

    def load(self, module: torch.nn.Module, recipes: list, stored: dict[str, torch.Tensor]) -> int:
        """Build ``module``'s parameters on the device; returns their bytes."""
        prefix = self.prefix[id(module)] + "."
        with section("dequantize"):
            state = {r.key[len(prefix):]: build(r, stored, self.device, self.block) for r in recipes}
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise RewriterError(f"{self.ckpt.url}: tensors of {prefix[:-1]} do not fit the model that "
                                f"config.json describes: {str(e).splitlines()[-1].strip()}") from None
        n = sum(t.nbytes for t in state.values())
        self.ledger.add(n)
        return n

    def free(self, module: torch.nn.Module, nbytes: int) -> None:
        module.to_empty(device="meta")
        self.ledger.drop(nbytes)

    def _load_now(self, module: torch.nn.Module) -> int:
        recipes, stored, _ = self.read(module)
        n = self.load(module, recipes, stored)
        self.ledger.drop(sum(t.nbytes for t in stored.values()))
        return n

    # --- running -----------------------------------------------------------------------------

    def _record(self, ids: torch.Tensor, want_args: bool) -> tuple[torch.Tensor, list | None]:
        """Layer 0's input for ``ids`` and, when ``want_args``, every layer's call arguments
        (everything but the hidden states) as the model's own forward passes them."""
        layers = self.base.layers
        calls: list[tuple[tuple, dict]] = []
        first: list[torch.Tensor] = []

        def recorder(i: int) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if i == 0:
                    first.append(hidden)
                calls.append((tuple(args[1:]), dict(kwargs)))
                if i == len(layers) - 1 or not want_args:
                    raise _Stop
                return hidden
            return forward

        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        try:
            self.base(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        except (ValueError, TypeError) as e:
            # The model unpacked what a stand-in layer returned: its layers return more than their
            # hidden states (state one layer hands the next), which streaming layer by layer loses.
            raise RewriterError(f"{type(layers[0]).__name__} returns more than its hidden states (state it "
                                f"passes to the next layer), which the streamed engine cannot carry; run "
                                f"without --streamed") from e
        finally:
            for layer in layers:
                del layer.forward
        return first[0], (calls if want_args else None)

    def run(self, batches: Sequence[np.ndarray], head: Callable[[torch.Tensor, torch.Tensor], Any], *,
            on_layer: Callable[[int, int], None] | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> list[Any]:
        """Every batch (``[B, T]`` token ids) through the whole model.

        Args:
            head: called per batch with the final hidden states (after the model's norm) and
                the ids; its results are returned in batch order. ``self.model.lm_head`` is
                loaded while it runs.
            on_layer: ``(layer, batch)`` after each forward of a layer's MoE: over one batch, or
                (layer-batched) over a chunk of batches ending with ``batch``; the observer reads
                its slots then.
            progress: ``(stage, done, total)`` after each layer.
        """
        t_start = time.perf_counter()
        self.check_runnable()
        self.stats, self.ledger = EngineStats(attention=str(self.model.config._attn_implementation)), WeightLedger()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with torch.no_grad():
                store, args = self._embed(batches)
                self._layers(batches, store, args, on_layer, progress)
                out = self._head(batches, store, head)
        except Exception as e:
            if is_out_of_memory(e):  # the one place the engine's allocations fail: say where and what to lower
                kind, what = self.doing
                kind += ", batch by batch" if kind == "run" and self.expert_chunk == 0 else ""
                raise out_of_memory(e, f"on {self.device} {what}", _REMEDY[kind]) from None
            raise
        finally:
            if self.device.type == "cuda" and self.gpu_memory is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, self._index())
        self.stats.total_s = time.perf_counter() - t_start
        if self.device.type == "cuda":
            self.stats.peak_device_bytes = torch.cuda.max_memory_allocated(self.device)
        return out

    def _embed(self, batches: Sequence[np.ndarray]) -> tuple[ActivationStore, dict[tuple[int, ...], list]]:
        t0 = time.perf_counter()
        embed = self.base.get_input_embeddings()
        self.doing = ("load", "loading the input embeddings")
        n = self._load_now(embed)
        sizes = [self._layer_bytes(i) for i in range(len(self.base.layers))]
        free = self._activation_budget(sizes)
        self.stats.expert_chunk = chunk = self._expert_chunk(free, max(b.size for b in batches))
        if self.device.type == "cuda":
            free = max(0, free - chunk * self._token_bytes())
        store = ActivationStore(self.device, free, self._pin)
        args: dict[tuple[int, ...], list] = {}
        for i, b in enumerate(batches):
            self.doing = ("run", f"embedding batch {i + 1} of {len(batches)}")
            ids = torch.as_tensor(b, device=self.device)
            shape = tuple(ids.shape)
            with section("embed"):
                hidden, calls = self._record(ids, shape not in args)
            if calls is not None:
                args[shape] = calls
            store.put(i, hidden)
        self.free(embed, n)
        self.stats.embed_s = time.perf_counter() - t0
        self.stats.activation_budget = store.budget
        self.stats.activation_bytes = store.total
        self.stats.activations_on_device = store.on_device
        return store, args

    def _layer_bytes(self, i: int) -> int:
        """Bytes of layer ``i``'s parameters once built (from the skeleton's shapes)."""
        layer = self.base.layers[i]
        size = torch.tensor([], dtype=self.dtype).element_size()
        return sum(p.numel() * size for p in layer.parameters())

    def _token_bytes(self) -> int:
        """Device bytes per token of a layer-batched MoE forward (the largest over the layers)."""
        layers = [m for m in self.base.layers if isinstance(getattr(m, "mlp", None), torch.nn.Module)]
        return max((deferred.token_bytes(self.model.config, m, self.dtype) for m in layers), default=1)

    def _expert_chunk(self, free: int, batch_tokens: int) -> int:
        """Tokens per layer-batched MoE forward: as given, else (on CUDA) what three quarters of
        the memory left for activations holds, at least one batch."""
        if self.expert_chunk is not None:
            return self.expert_chunk
        if self.device.type != "cuda":
            return deferred.CPU_CHUNK
        return deferred.chunk_for(free, batch_tokens, self._token_bytes())

    def _activation_budget(self, sizes: Sequence[int]) -> int:
        """Device bytes for hidden states and the layer-batched MoE: the memory cap (or free
        memory) less what the layer phase or the head phase needs at most, and a workspace;
        ``sizes`` are the decoder layers' bytes. Refuses a layer that alone cannot fit."""
        if self.device.type != "cuda":
            return 1 << 62
        layer_bytes = max(sizes)
        cap = self.gpu_memory
        total = torch.cuda.get_device_properties(self.device).total_memory
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), self._index())
        else:
            # Free memory plus what this process's allocator already holds: an earlier run in the
            # same process (eval --compare's model before its base) leaves its blocks cached,
            # reusable here though the device counts them as used.
            cap = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device)
        check_layer_room(sizes.index(layer_bytes), layer_bytes, cap - torch.cuda.memory_allocated(self.device),
                         str(self.device), self.dtype, capped=self.gpu_memory is not None)
        size = torch.tensor([], dtype=self.dtype).element_size()
        head = self.base.get_input_embeddings().weight.numel() * size
        # The layer phase holds one built layer and, while it is built, one tensor's raw bytes and
        # dequantization temporaries (half a layer leaves room for attention's workspace too);
        # the head phase the output embedding and float32 logits of one chunk (several copies).
        layer_phase = layer_bytes + layer_bytes // 2
        head_phase = head + HEAD_CHUNK * self.model.config.vocab_size * 4 * 4
        return max(0, cap - torch.cuda.memory_allocated(self.device) - max(layer_phase, head_phase) - WORKSPACE)

    def _layers(self, batches: Sequence[np.ndarray], store: ActivationStore, args: dict,
                on_layer: Callable[[int, int], None] | None,
                progress: Callable[[str, int, int], None] | None) -> None:
        layers = self.base.layers
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-reader") as reader:
            ahead: Future | None = reader.submit(self.read, layers[0])
            for i, layer in enumerate(layers):
                timing = LayerTiming(i)
                t0 = time.perf_counter()
                assert ahead is not None
                self.doing = ("read", f"reading layer {i}'s weights into host memory")
                with section("read_wait"):
                    recipes, stored, timing.read_s = ahead.result()
                timing.wait_s = time.perf_counter() - t0
                timing.raw_bytes = sum(t.nbytes for t in stored.values())
                ahead = reader.submit(self.read, layers[i + 1]) if i + 1 < len(layers) else None
                t1 = time.perf_counter()
                self.doing = ("load", f"building layer {i}'s weights ({_size(self._layer_bytes(i))} as "
                                      f"{str(self.dtype).removeprefix('torch.')})")
                timing.weight_bytes = self.load(layer, recipes, stored)
                del stored
                self.ledger.drop(timing.raw_bytes)
                self._sync()
                timing.load_s = time.perf_counter() - t1
                t2 = time.perf_counter()
                self._compute(i, batches, store, args, on_layer)
                self._sync()
                timing.compute_s = time.perf_counter() - t2
                self.free(layer, timing.weight_bytes)
                self.stats.layers.append(timing)
                self.stats.peak_weight_bytes = self.ledger.peak
                if progress is not None:
                    progress("layer", i + 1, len(layers))

    def _compute(self, i: int, batches: Sequence[np.ndarray], store: ActivationStore, args: dict,
                 on_layer: Callable[[int, int], None] | None) -> None:
        """Every batch through layer ``i``: whole layer calls batch by batch, or attention batch
        by batch and the MoE over chunks of batches (:mod:`profiling.deferred`).
        ``on_layer(i, b)`` follows each MoE forward, ``b`` the last batch it covered."""
        layer = self.base.layers[i]
        batched = self.stats.expert_chunk > 0 and deferred.deferrable(layer)
        self.stats.batched_layers += int(batched)
        for group in deferred.chunks([b.size for b in batches], self.stats.expert_chunk if batched else 0):
            with deferred.stashing(layer, self.dtype) if batched else contextlib.nullcontext() as stash:
                for b in group:
                    self._forward(layer, i, b, batches, store, args)
            if stash is not None:
                self.doing = ("run", f"running layer {i}'s experts over batches {group[0] + 1}-{group[-1] + 1}")
                with section("moe"):
                    outs = deferred.run_moe(layer.mlp, stash.kept)
                stash.kept.clear()
                for b, out in zip(group, outs):
                    with section("hidden_copies"):
                        store.put(b, store.get(b) + out)
            if on_layer is not None:
                self.doing = ("run", f"recording layer {i}'s routing after batch {group[-1] + 1}")
                on_layer(i, group[-1])

    def _forward(self, layer: torch.nn.Module, i: int, b: int, batches: Sequence[np.ndarray],
                 store: ActivationStore, args: dict) -> None:
        self.doing = ("run", f"running layer {i} on batch {b + 1} of {len(batches)}")
        with section("hidden_copies"):
            x = store.get(b)
        rest, kwargs = args[tuple(batches[b].shape)][i]
        with section("layer_call"):
            y = layer(x, *rest, **kwargs)
        with section("hidden_copies"):
            store.put(b, y[0] if isinstance(y, tuple) else y)

    def _head(self, batches: Sequence[np.ndarray], store: ActivationStore, head) -> list[Any]:
        t0 = time.perf_counter()
        norm, lm_head = self.final_norm(), self.model.get_output_embeddings()
        self.doing = ("load", "loading the final norm and the output head")
        n_norm = self._load_now(norm)
        n_head = self._load_now(lm_head) if not self._tied() else self._load_tied(lm_head)
        out = []
        for b in range(len(batches)):
            self.doing = ("run", f"in the head (final norm, output head, logits) on batch {b + 1} of {len(batches)}")
            ids = torch.as_tensor(batches[b], device=self.device)
            with section("head"):
                out.append(head(norm(store.get(b)), ids))
            store.drop(b)
        self.free(norm, n_norm)
        self.free(lm_head, n_head)
        self.stats.head_s = time.perf_counter() - t0
        return out

    def check_runnable(self) -> None:
        """Refuse, before any weight is read, a model whose base has no decoder-layer list or no
        final norm to run layer by layer."""
        if not isinstance(getattr(self.base, "layers", None), torch.nn.ModuleList):
            raise RewriterError(f"{type(self.model).__name__}: its base model ({type(self.base).__name__}) has no "
                                f"list of decoder layers (layers) for the streamed engine to run one by one; run "
                                f"without --streamed")
        self.final_norm()

    def final_norm(self) -> torch.nn.Module:
        """The norm the model applies after its last layer: ``norm``, or the base model's one
        top-level norm module under another name (LFM2's ``embedding_norm``)."""
        norm = getattr(self.base, "norm", None)
        if isinstance(norm, torch.nn.Module):
            return norm
        found = [m for name, m in self.base.named_children() if type(m).__name__.endswith("Norm")]
        if len(found) != 1:
            raise RewriterError(f"{type(self.base).__name__} has {len(found)} top-level norm modules and none named "
                                f"norm, so the streamed engine cannot tell which follows the last layer; run "
                                f"without --streamed")
        return found[0]

    def _tied(self) -> bool:
        prefix = self.prefix[id(self.model.get_output_embeddings())]
        return prefix + ".weight" not in self.ckpt.tensors and bool(
            getattr(self.model.config, "tie_word_embeddings", False))

    def _load_tied(self, lm_head: torch.nn.Module) -> int:
        embed = self.base.get_input_embeddings()
        recipe = self.recipes.recipe(self.prefix[id(embed)] + ".weight")
        stored = read_tensors(self.ckpt.storage, self.recipes.sources([recipe]), pin=self._pin)
        w = build(recipe, stored, self.device, self.block)
        lm_head.load_state_dict({"weight": w}, strict=False, assign=True)
        self.ledger.add(w.nbytes)
        return w.nbytes

    def _index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

