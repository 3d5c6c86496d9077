"""A reference MoE for the quality benchmark: offline corpora and a small gpt-oss trained on them.

Corpora exist on any machine with Python, and their hashes and sizes are recorded:

* ``code``: the standard library's top-level ``*.py`` files, one document each;
* ``prose``: the Python documentation topics shipped in ``pydoc_data.topics``;
* ``arith``: generated arithmetic (``47+38=85``, ``7*38=266``), seeded; the problems of the
  calibration and evaluation splits never occur in training (:func:`arith_pools`).

Documents are split by index: 8 of every 10 train, 1 calibrates (profiling), 1 evaluates, so
calibration and evaluation never share text. Tokens are UTF-8 bytes (vocabulary 256, NUL as the
end of a document).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

DOMAINS = ("code", "prose", "arith")
SPLITS = ("train", "calib", "eval")


@dataclass(frozen=True)
class ModelSize:
    layers: int = 6
    experts: int = 16
    top_k: int = 4
    hidden: int = 256
    intermediate: int = 256
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64


def _code_docs(limit: int) -> list[str]:
    docs, size = [], 0
    for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        size += len(text)
        if size >= limit:
            break
    return docs


def _prose_docs(limit: int) -> list[str]:
    from pydoc_data.topics import topics

    docs, size = [], 0
    for key in sorted(topics):
        docs.append(topics[key])
        size += len(topics[key])
        if size >= limit:
            break
    return docs


#: Arithmetic problems: ``a+b`` and ``a-b`` with operands below 100, ``a*b`` with a one-digit ``a``
#: (2..9) and a two-digit ``b``.
ARITH_KINDS = ("+", "-", "*")
#: Share of each kind's problems held out of training for calibration and, as many again, evaluation.
ARITH_HELD_OUT = 0.15


def _problems(kind: str) -> list[tuple[int, int]]:
    if kind == "*":
        return [(a, b) for a in range(2, 10) for b in range(10, 100)]
    return [(a, b) for a in range(100) for b in range(100)]


def arith_pools(seed: int = 0) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """Split -> kind -> its problems: each kind's problem set shuffled with ``seed`` and cut into
    a calibration and an evaluation pool (``ARITH_HELD_OUT`` each) and the training rest, so no
    calibration or evaluation problem is ever trained on."""
    pools: dict[str, dict[str, list[tuple[int, int]]]] = {s: {} for s in SPLITS}
    for kind in ARITH_KINDS:
        probs = _problems(kind)
        random.Random(f"{seed}{kind}").shuffle(probs)
        n = round(ARITH_HELD_OUT * len(probs))
        pools["calib"][kind], pools["eval"][kind], pools["train"][kind] = probs[:n], probs[n : 2 * n], probs[2 * n :]
    return pools


def _split_of(i: int) -> str:
    return {8: "calib", 9: "eval"}.get(i % 10, "train")


def _arith_docs(limit: int, seed: int = 0) -> list[str]:
    """Documents of 24 problems each, kinds equally likely; document ``i`` draws from the pool of
    the split it will land in (:func:`_split_of`)."""
    rng = random.Random(seed)
    pools = arith_pools(seed)
    docs: list[str] = []
    size = 0
    while size < limit:
        pool = pools[_split_of(len(docs))]
        lines = []
        for _ in range(24):
            op = rng.choice(ARITH_KINDS)
            a, b = rng.choice(pool[op])
            c = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{a}{op}{b}={c}")
        docs.append("\n".join(lines) + "\n")
        size += len(docs[-1])
    return docs


def _chunks(docs: list[str], size: int = 2048) -> list[str]:
    """Cut documents at line ends into pieces of about ``size`` characters, so every split
    gets text from across the corpus."""
    out = []
    for d in docs:
        piece: list[str] = []
        n = 0
        for line in d.splitlines(keepends=True):
            piece.append(line)
            n += len(line)
            if n >= size:
                out.append("".join(piece))
                piece, n = [], 0
        if piece:
            out.append("".join(piece))
    return out


def build_corpora(out: Path, limit_bytes: int = 4_000_000) -> dict[str, Any]:
    """Write ``out/{domain}-{split}.jsonl`` and return each file's sha256 and size."""
    out.mkdir(parents=True, exist_ok=True)
    sources = {"code": _chunks(_code_docs(limit_bytes)), "prose": _chunks(_prose_docs(limit_bytes)),
               "arith": _arith_docs(limit_bytes)}  # short documents, split by index as generated
    record = {}
    for domain, docs in sources.items():
        for split in SPLITS:
            chosen = [d for i, d in enumerate(docs) if _split_of(i) == split]
            path = out / f"{domain}-{split}.jsonl"
            path.write_text("".join(json.dumps({"text": d}) + "\n" for d in chosen))
            raw = path.read_bytes()
            record[f"{domain}-{split}"] = {"documents": len(chosen), "bytes": len(raw),
                                           "sha256": hashlib.sha256(raw).hexdigest()}
    return record


def _stream(path: Path) -> np.ndarray:
    ids: list[int] = []
    for line in path.read_text().splitlines():
        ids.extend(json.loads(line)["text"].encode("utf-8"))
        ids.append(0)
    return np.asarray(ids, dtype=np.int64)


def train(
    corpora: Path, out: Path, *, size: ModelSize = ModelSize(), steps: int = 3000, seq_len: int = 512,
    batch_size: int = 32, lr: float = 2e-3, seed: int = 0, device: str = "cuda", log=print,
    budget: float | None = None, trace: Path | None = None,
) -> dict[str, Any]:
    """Train the reference gpt-oss MoE on the three training splits (equal mixture); save it.

    The seed fixes the initialization and the batches; on CUDA the kernels are left free to
    choose their (faster, non-deterministic) algorithms, so two runs of one seed agree closely,
    not bit for bit. The loss is read back only when logged, so the host queues steps ahead of
    the GPU.

    With ``budget`` (seconds), training has a time budget instead of a step count: the learning-rate
    schedule follows the elapsed share of the budget and training stops when it is spent (or
    after ``steps``, whichever comes first); the steps done are recorded. A GPU budget is what
    the benchmark has, and the same budget trains more on a faster machine. The budget's clock
    starts after the first step, which on CUDA also compiles the model (recorded as
    ``compile_seconds``), so compilation takes no share of the schedule.

    On CUDA the step runs as fast as this small model allows: the experts as grouped matmuls in
    bfloat16 (:func:`grouped_experts_forward`), attention as flex attention (fused kernels with
    the sinks and sliding windows, where transformers' eager attention materializes every score
    matrix), and the whole forward under ``torch.compile`` (a step of this model is otherwise
    bound by kernel launches). Where compilation fails the step runs uncompiled, and says so.

    With ``trace``, steps ``TRACE_FROM`` to ``TRACE_FROM + TRACE_STEPS - 1`` run under
    torch.profiler, and its table of operators by device time (host time on a CPU) is written
    there: where a training step's time goes."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cfg = GptOssConfig(
        vocab_size=256, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim, num_local_experts=size.experts, num_experts_per_tok=size.top_k,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(size.layers)],
        sliding_window=128, max_position_embeddings=4096, eos_token_id=0, pad_token_id=0, bos_token_id=0,
        output_router_logits=True, router_aux_loss_coef=0.02, tie_word_embeddings=False,
    )
    model = GptOssForCausalLM(cfg).to(device)
    default_experts = model.config._experts_implementation
    default_attention = model.config._attn_implementation
    forward = model
    if device.startswith("cuda"):
        _use_grouped_experts(model)
        from profiling.streamed import set_attention

        set_attention(model, torch.device(device), str(out))
        forward = torch.compile(model)
    streams = {d: _stream(corpora / f"{d}-train.jsonl") for d in DOMAINS}
    rng = np.random.default_rng(seed)
    use_amp = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=use_amp or None)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if budget is not None:  # warm up over the first 5 % of the budget, then a cosine to 0
            done = 0.0 if t_budget is None else min(1.0, (time.perf_counter() - t_budget) / budget)
            if done < 0.05:
                return lr * max(done / 0.05, 1 / warmup)
            return lr * 0.5 * (1 + math.cos(math.pi * (done - 0.05) / 0.95))
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    t0 = time.perf_counter()
    t_budget: float | None = None  # after the first step (and its compilation)
    compile_seconds = 0.0
    losses: list[Any] = []  # loss tensors: reading each one would wait for the GPU every step
    model.train()
    done_steps = 0
    tracer = None
    for step in range(steps):
        if budget is not None and t_budget is not None and time.perf_counter() - t_budget >= budget:
            break
        done_steps = step + 1
        if trace is not None and step == TRACE_FROM:
            tracer = _Tracer(use_amp)
        batch = []
        for b in range(batch_size):
            s = streams[DOMAINS[b % len(DOMAINS)]]
            start = int(rng.integers(0, len(s) - seq_len - 1))
            batch.append(s[start : start + seq_len])
        ids = torch.as_tensor(np.stack(batch), device=device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        try:
            loss = _step_loss(forward, ids, use_amp)
        except Exception as e:  # the first step finds what this machine can run
            if step or (forward is model and model.config._experts_implementation == "eager"):
                raise
            if forward is not model:
                log(f"  the compiled step failed here ({type(e).__name__}: {str(e)[:300]}); training uncompiled")
                forward = model
            else:
                log(f"  {model.config._experts_implementation} experts cannot train here ({e}); using eager")
                model.config._experts_implementation = "eager"
            loss = _step_loss(forward, ids, use_amp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
        if t_budget is None:
            if use_amp:
                torch.cuda.synchronize()
            t_budget = time.perf_counter()
            compile_seconds = t_budget - t0
        if tracer is not None and step == TRACE_FROM + TRACE_STEPS - 1:
            tracer.write(trace, TRACE_STEPS)
            tracer = None
        if (step % max(1, steps // 10) == 0 if budget is None else step % 200 == 0) or step == steps - 1:
            recent = torch.stack(losses[-50:]).float().mean().item()
            log(f"  train step {step:5d}/{steps}  loss {recent:.4f}  {time.perf_counter() - t0:6.1f} s")
    if trace is not None and tracer is not None:  # training ended inside the traced steps
        tracer.write(trace, done_steps - TRACE_FROM)
    elif trace is not None and done_steps <= TRACE_FROM:
        trace.write_text(f"no step traced: training ended after {done_steps} steps, before step {TRACE_FROM}\n")
    seconds = time.perf_counter() - t0
    model.config.output_router_logits = False
    trained_with = model.config._experts_implementation
    attention_used = model.config._attn_implementation
    model.config._experts_implementation = default_experts  # the saved model runs as any other
    if attention_used != default_attention:
        model.set_attn_implementation(default_attention)
    model.eval().to(torch.bfloat16).save_pretrained(str(out))
    info = {"size": asdict(size), "steps": done_steps, "max_steps": steps, "budget_seconds": budget,
            "tokens": done_steps * batch_size * seq_len, "experts": trained_with, "attention": attention_used,
            "compiled": forward is not model, "compile_seconds": compile_seconds, "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
            "seed": seed, "device": device, "train_seconds": seconds, "final_loss": torch.stack(losses[-50:]).float().mean().item(),
            "params": sum(p.numel() for p in model.parameters())}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _step_loss(forward, ids, use_amp: bool):
    """One training step's loss, its gradients computed (the optimizer step is the caller's)."""
    import torch

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
        loss = forward(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


#: The experts implementation :func:`train` registers on CUDA.
TRAIN_EXPERTS = "refmoe_grouped_bf16"


def grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """gpt-oss experts as transformers' eager implementation computes them, with each expert's
    rows in one grouped matmul in bfloat16 (weights cast from the float32 master copy, so the
    gradient reaches it): no host synchronization, unlike the eager loop over experts, whose
    per-expert index lookups stall the GPU once per expert per layer."""
    import torch
    from transformers.integrations.moe import _grouped_mm

    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    offsets = torch.cumsum(torch.bincount(sorted_ids, minlength=self.num_experts), dim=0, dtype=torch.int32)
    tokens = order // k
    x = hidden_states.index_select(0, tokens).to(torch.bfloat16)
    # Each row's expert bias as a one-hot matmul: its gradient is a matmul too, where indexing the
    # bias by expert would scatter-add a hundred thousand rows into a few (serialized on the GPU).
    one_hot = torch.nn.functional.one_hot(sorted_ids, self.num_experts).to(torch.bfloat16)
    up = _grouped_mm(x, self.gate_up_proj.to(torch.bfloat16), offsets) + one_hot @ self.gate_up_proj_bias.to(torch.bfloat16)
    h = self._apply_gate(up)
    y = _grouped_mm(h.to(torch.bfloat16), self.down_proj.to(torch.bfloat16), offsets) + one_hot @ self.down_proj_bias.to(torch.bfloat16)
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    out = torch.zeros(hidden_states.shape, dtype=y.dtype, device=hidden_states.device)
    return out.index_add_(0, tokens, y).to(hidden_states.dtype)


def _use_grouped_experts(model) -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(TRAIN_EXPERTS, grouped_experts_forward)
    model.config._experts_implementation = TRAIN_EXPERTS


#: Steps of :func:`train` that ``trace`` profiles (after the first steps' one-time costs).
TRACE_FROM, TRACE_STEPS = 5, 3


class _Tracer:
    """torch.profiler over a few training steps; writes its operator table."""

    def __init__(self, cuda: bool):
        import torch

        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        self.cuda, self.t0 = cuda, time.perf_counter()
        self.prof = torch.profiler.profile(activities=acts)
        self.prof.__enter__()

    def write(self, path: Path, steps: int) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - self.t0) / steps
        self.prof.__exit__(None, None, None)
        key = "device_time_total" if self.cuda else "cpu_time_total"
        table = self.prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60)
        path.write_text(f"{steps} training steps traced, {seconds:.3f} s per step (profiler on)\n{table}\n")
