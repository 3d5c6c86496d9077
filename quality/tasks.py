"""Task accuracy of the byte-level reference MoE: exact match of greedy generation.

Two held-out tasks, built from the evaluation split of :mod:`quality.refmoe`'s corpora (text the
model never trained on, nor was profiled on):

* ``arith``: the answer of an arithmetic problem (``417*38=`` -> ``15846``);
* ``code``: the next line of a Python file, indentation included.

Each problem is a prompt of exactly ``context`` bytes (the evaluation stream, documents joined by
NUL as in training, up to the problem) and a target line. A problem is solved when greedy
generation produces the target followed by a newline. Problems are drawn with a fixed seed, so
every model is asked the same ones.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NEWLINE = 10
_ARITH = re.compile(rb"(?m)^\d+[-+*]\d+=(-?\d+)$")


@dataclass(frozen=True)
class Task:
    """Fixed-length prompts (``[N, context]`` byte ids) and their target lines."""

    name: str
    prompts: np.ndarray
    targets: tuple[bytes, ...]
    max_new: int


def _stream(path: Path) -> bytes:
    return b"".join(json.loads(line)["text"].encode("utf-8") + b"\0" for line in path.read_text().splitlines())


def _task(name: str, stream: bytes, spans: list[tuple[int, int]], n: int, context: int, seed: int) -> Task:
    """Problems whose target is ``stream[a:b]`` (a line without its newline), ``n`` drawn at random."""
    usable = [(a, b) for a, b in spans if a >= context]
    chosen = sorted(random.Random(seed).sample(usable, min(n, len(usable))))
    if not chosen:
        raise ValueError(f"{name}: no problem has {context} bytes of context")
    prompts = np.stack([np.frombuffer(stream[a - context : a], dtype=np.uint8) for a, _ in chosen]).astype(np.int64)
    targets = tuple(stream[a:b] for a, b in chosen)
    return Task(name, prompts, targets, max(len(t) for t in targets) + 1)


def arith_task(eval_jsonl: Path, n: int = 256, context: int = 256, seed: int = 0) -> Task:
    """Answers of held-out arithmetic problems; the prompt ends with ``=``."""
    stream = _stream(eval_jsonl)
    spans = [(m.start(1), m.end(1)) for m in _ARITH.finditer(stream)]
    return _task("arith", stream, spans, n, context, seed)


def code_task(eval_jsonl: Path, n: int = 128, context: int = 256, seed: int = 0, min_len: int = 8,
              max_len: int = 48) -> Task:
    """Next lines of held-out Python code with ``min_len`` to ``max_len`` bytes (some text
    besides indentation); the prompt ends at the previous newline."""
    stream = _stream(eval_jsonl)
    spans = []
    start = 0
    for end in (m.start() for m in re.finditer(b"\n", stream)):
        line = stream[start:end]
        if min_len <= len(line) <= max_len and line.strip() and b"\0" not in line:
            spans.append((start, end))
        start = end + 1
    return _task("code", stream, spans, n, context, seed)


def accuracy(model, task: Task, batch_size: int = 128) -> dict[str, Any]:
    """Exact-match accuracy of greedy generation on ``task``."""
    import torch

    device = next(model.parameters()).device
    solved = 0
    for i in range(0, len(task.targets), batch_size):
        ids = torch.as_tensor(task.prompts[i : i + batch_size], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=task.max_new,
                                 do_sample=False, eos_token_id=NEWLINE, pad_token_id=0)
        for row, target in zip(out[:, ids.shape[1] :].tolist(), task.targets[i : i + batch_size]):
            solved += bytes(row[: len(target) + 1]) == target + b"\n"
    return {"problems": len(task.targets), "solved": solved, "accuracy": solved / len(task.targets)}


def build_tasks(corpora: Path, arith_n: int, code_n: int, context: int) -> list[Task]:
    return [arith_task(corpora / "arith-eval.jsonl", arith_n, context), code_task(corpora / "code-eval.jsonl", code_n, context)]


def score_tasks(model, tasks: list[Task]) -> dict[str, dict[str, Any]]:
    return {t.name: accuracy(model, t) for t in tasks}
