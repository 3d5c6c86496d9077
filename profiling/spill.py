"""Per-pair expert contributions and per-token confidence spilled to disk, reduced to EAFT-REAP.

EAFT-REAP weights each routed pair by its token's class, which needs the 15th percentiles of the
reference-token probability ``p`` and entropy ``H`` over all profiled tokens: known only after the
last batch. So every forward appends its pairs (expert ids as int16, ``g x ||f||`` as float32)
to one file per MoE layer and every batch's ``p``/``H`` to two more; tokens are in the same order
in all of them (batch order, then position), whichever order layers and batches ran in. The
reduction streams the files in chunks: memory stays bounded whatever the number of tokens.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np

from profiling.stats import eaft_weights, exact_percentile

#: Tokens per chunk when reading the spill back.
CHUNK = 1 << 18


class Spill:
    """Append-only spill files in ``folder`` (a temporary folder, removed on close, when None)."""

    def __init__(self, folder: str | Path | None = None):
        self.owned = folder is None
        self.folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="rewriter-profile-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, IO[bytes]] = {}
        self.tokens = 0

    def _append(self, name: str, values: np.ndarray) -> None:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(self.folder / name, "ab")
        f.write(np.ascontiguousarray(values).tobytes())

    def pairs(self, layer: int, ids: np.ndarray, contrib: np.ndarray) -> None:
        """One forward's routed pairs of ``layer``: ``[tokens, k]`` expert ids and contributions."""
        self._append(f"ids{layer}.i16", ids.astype(np.int16))
        self._append(f"c{layer}.f32", contrib.astype(np.float32))

    def confidence(self, p: np.ndarray, h: np.ndarray) -> None:
        """One batch's per-token ``p`` and ``H`` (NaN where there is no reference token)."""
        self._append("p.f32", p.astype(np.float32))
        self._append("h.f32", h.astype(np.float32))
        self.tokens += p.size

    def _flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def _values(self, name: str, dtype: type) -> np.ndarray:
        path = self.folder / name
        if not path.exists() or path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def thresholds(self, p_quantile: float, h_quantile: float) -> tuple[float, float]:
        """Exact percentiles of ``p`` and ``H`` over every token that has a reference."""
        return thresholds([self], p_quantile, h_quantile)

    def eaft(self, layer: int, num_experts: int, p_lo: float, h_lo: float) -> np.ndarray:
        """EAFT-REAP of every expert of ``layer``: the token-weighted sum of its pairs."""
        self._flush()
        p, h = self._values("p.f32", np.float32), self._values("h.f32", np.float32)
        ids, contrib = self._values(f"ids{layer}.i16", np.int16), self._values(f"c{layer}.f32", np.float32)
        out = np.zeros(num_experts, dtype=np.float64)
        if p.size == 0 or ids.size == 0:
            return out
        k = ids.size // p.size
        for s in range(0, p.size, CHUNK):
            pc = np.asarray(p[s : s + CHUNK], dtype=np.float64)
            hc = np.asarray(h[s : s + CHUNK], dtype=np.float64)
            valid = ~np.isnan(pc)
            w = np.where(valid, eaft_weights(np.nan_to_num(pc), np.nan_to_num(hc), p_lo, h_lo), 0.0)
            rows = slice(s * k, (s + pc.size) * k)
            c = np.asarray(contrib[rows], dtype=np.float64).reshape(-1, k) * w[:, None]
            out += np.bincount(np.asarray(ids[rows], dtype=np.int64), weights=c.ravel(), minlength=num_experts)
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self.owned:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def thresholds(spills: Sequence[Spill], p_quantile: float, h_quantile: float) -> tuple[float, float]:
    """Exact percentiles of ``p`` and ``H`` over every token with a reference in all ``spills``
    together: percentiles of one multiset of values, whichever spill holds which token."""
    for spill in spills:
        spill._flush()

    def chunks(name: str):
        def it():
            for spill in spills:
                values = spill._values(name, np.float32)
                for s in range(0, values.size, CHUNK):
                    v = np.asarray(values[s : s + CHUNK], dtype=np.float64)
                    yield v[~np.isnan(v)]
        return it

    return exact_percentile(chunks("p.f32"), p_quantile), exact_percentile(chunks("h.f32"), h_quantile)
