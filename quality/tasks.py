"""Task accuracy of the byte-level reference MoE: exact match of greedy generation, and the
teacher-forced accuracy of the answer's bytes.

Two held-out tasks, built from the evaluation split of :mod:`quality.refmoe`'s corpora (text the
model never trained on, nor was profiled on):

* ``arith``: the answer of an arithmetic problem (``47+38=`` -> ``85``); the evaluation split
  draws its problems from a pool that the training split never contains
  (:func:`quality.refmoe.arith_pools`), so a problem is solved by computing, not by recall. Each
  problem's kind (``+``, ``-``, ``*``) is kept for per-kind accuracy;
* ``code``: the second half of a line of Python, given everything up to its middle.

Each problem is a prompt of exactly ``context`` bytes (the evaluation stream, documents joined by
NUL as in training, up to the problem) and a target: the rest of the line, without its newline.

A problem is solved when greedy generation produces the target followed by a newline. Greedy
decoding writes byte ``i`` of that answer exactly when the model's argmax after the prompt and
the answer's first ``i`` bytes is that byte, so one teacher-forced forward pass over
``prompt + answer`` decides exact match for every problem of a batch at once (no token-by-token
generation). The same pass gives the second, more sensitive number: the fraction of answer bytes
(the newline included) that are the argmax given the gold prefix. Problems are drawn with a fixed
seed, so every model is asked the same ones.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NEWLINE = 10
_ARITH = re.compile(rb"(?m)^\d+([-+*])\d+=(-?\d+)$")


@dataclass(frozen=True)
class Task:
    """Fixed-length prompts (``[N, context]`` byte ids), their target lines and each problem's kind."""

    name: str
    prompts: np.ndarray
    targets: tuple[bytes, ...]
    kinds: tuple[str, ...]


def _stream(path: Path) -> bytes:
    return b"".join(json.loads(line)["text"].encode("utf-8") + b"\0" for line in path.read_text().splitlines())


def _task(name: str, stream: bytes, spans: list[tuple[int, int, str]], n: int, context: int, seed: int) -> Task:
    """Problems whose target is ``stream[a:b]`` (the rest of a line), ``n`` drawn at random."""
    usable = [s for s in spans if s[0] >= context]
    chosen = sorted(random.Random(seed).sample(usable, min(n, len(usable))))
    if not chosen:
        raise ValueError(f"{name}: no problem has {context} bytes of context")
    prompts = np.stack([np.frombuffer(stream[a - context : a], dtype=np.uint8) for a, _, _ in chosen]).astype(np.int64)
    return Task(name, prompts, tuple(stream[a:b] for a, b, _ in chosen), tuple(k for _, _, k in chosen))


def arith_task(eval_jsonl: Path, n: int = 512, context: int = 128, seed: int = 0) -> Task:
    """Answers of held-out arithmetic problems; the prompt ends with ``=``; kinds ``+ - *``."""
    stream = _stream(eval_jsonl)
    spans = [(m.start(2), m.end(2), m.group(1).decode()) for m in _ARITH.finditer(stream)]
    return _task("arith", stream, spans, n, context, seed)


def code_task(eval_jsonl: Path, n: int = 512, context: int = 128, seed: int = 0, min_text: int = 8,
              max_len: int = 48) -> Task:
    """Second halves of held-out lines of Python of at most ``max_len`` bytes with at least
    ``min_text`` bytes besides indentation; the prompt ends in the middle of that text."""
    stream = _stream(eval_jsonl)
    spans = []
    start = 0
    for end in (m.start() for m in re.finditer(b"\n", stream)):
        line = stream[start:end]
        text = line.lstrip(b" \t")
        if min_text <= len(text.rstrip()) and len(line) <= max_len and b"\0" not in line:
            spans.append((end - len(text) // 2, end, "line"))
        start = end + 1
    return _task("code", stream, spans, n, context, seed)


def accuracy(model, task: Task, batch_size: int = 256) -> dict[str, Any]:
    """Exact match of greedy generation and teacher-forced answer-byte accuracy on ``task``,
    overall and per kind."""
    import torch

    device = next(model.parameters()).device
    ctx = task.prompts.shape[1]
    solved, right, total = [], [], []
    for i in range(0, len(task.targets), batch_size):
        answers = [t + b"\n" for t in task.targets[i : i + batch_size]]
        width = max(len(a) for a in answers)
        ids = np.zeros((len(answers), ctx + width), dtype=np.int64)  # right padding: causal, never seen
        ids[:, :ctx] = task.prompts[i : i + batch_size]
        mask = np.zeros((len(answers), width), dtype=bool)
        for r, a in enumerate(answers):
            ids[r, ctx : ctx + len(a)] = np.frombuffer(a, dtype=np.uint8)
            mask[r, : len(a)] = True
        x = torch.as_tensor(ids, device=device)
        with torch.no_grad():
            pred = model(input_ids=x[:, :-1]).logits[:, ctx - 1 :].argmax(-1)
        hit = (pred == x[:, ctx:]).cpu().numpy() & mask
        right += hit.sum(1).tolist()
        total += mask.sum(1).tolist()
        solved += (hit.sum(1) == mask.sum(1)).tolist()
    by_kind: dict[str, list[int]] = defaultdict(list)
    for j, k in enumerate(task.kinds):
        by_kind[k].append(j)

    def summary(rows: list[int]) -> dict[str, Any]:
        return {"problems": len(rows), "solved": int(sum(solved[j] for j in rows)),
                "accuracy": sum(solved[j] for j in rows) / len(rows),
                "byte_accuracy": sum(right[j] for j in rows) / sum(total[j] for j in rows)}

    return {**summary(list(range(len(task.targets)))), "kinds": {k: summary(v) for k, v in sorted(by_kind.items())}}


def build_tasks(corpora: Path, arith_n: int, code_n: int, context: int) -> list[Task]:
    return [arith_task(corpora / "arith-eval.jsonl", arith_n, context), code_task(corpora / "code-eval.jsonl", code_n, context)]


def score_tasks(model, tasks: list[Task], batch_size: int = 256) -> dict[str, dict[str, Any]]:
    return {t.name: accuracy(model, t, batch_size) for t in tasks}
