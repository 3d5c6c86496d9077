"""Calibration data: JSONL text or pre-tokenized ids, tokenized and packed into sequences."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from core import jsonfile
from core.errors import RewriterError, count


class DataError(RewriterError):
    """Calibration or evaluation data that cannot be read."""


class ByteTokenizer:
    """UTF-8 bytes as token ids, for models without a tokenizer (vocabulary of at least 256)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def load_tokenizer(model_dir: str | Path, vocab_size: int):
    """The model's own tokenizer when its directory has one, else byte-level."""
    path = Path(model_dir)
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # transformers raises many types for a broken tokenizer
            raise DataError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    if vocab_size < 256:
        raise DataError(f"{model_dir} has no tokenizer and a vocabulary of {vocab_size} < 256 (byte-level needs 256)")
    return ByteTokenizer()


class LazyTokenizer:
    """Loads the tokenizer on the first text to encode: pre-tokenized data needs none."""

    def __init__(self, model_dir: str | Path, vocab_size: int):
        self.model_dir, self.vocab_size, self._tok = model_dir, vocab_size, None

    def get(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.model_dir, self.vocab_size)
        return self._tok


def documents(paths: Sequence[str | Path], tokenizer, vocab_size: int | None = None) -> Iterator[list[int]]:
    """Token ids per document.

    Accepted files: ``.jsonl`` with a ``text`` field (tokenized) or an ``input_ids`` field
    (used as is), ``.npy`` (one 1-D array of ids), anything else as one plain-text (UTF-8)
    document. A file that is none of these, or holds ids at or above ``vocab_size``, raises
    :class:`DataError` naming it.
    """
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"{p}: {'is a folder' if p.is_dir() else 'file not found'}; --data takes "
                            f".jsonl, .npy or UTF-8 text files")
        try:
            if p.suffix == ".npy":
                yield _in_vocab(_ids(np.load(p, allow_pickle=False).ravel().tolist(), str(p)), vocab_size, str(p))
            elif p.suffix == ".jsonl":
                yield from _jsonl(p, tokenizer, vocab_size)
            else:
                yield _in_vocab(_encode(tokenizer, p.read_text(encoding="utf-8")), vocab_size, str(p))
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (byte {e.start}); --data takes .jsonl, .npy or UTF-8 "
                            f"text files") from None
        except (ValueError, OSError) as e:
            raise DataError(f"{p}: cannot read it as {p.suffix or 'text'} data ({e})") from None


def _jsonl(p: Path, tokenizer, vocab_size: int | None) -> Iterator[list[int]]:
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = jsonfile.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: not valid JSON ({e})") from None
            if isinstance(doc, dict) and "input_ids" in doc:
                yield _in_vocab(_ids(doc["input_ids"], f"{p}:{n}"), vocab_size, f"{p}:{n}")
            elif isinstance(doc, dict) and isinstance(doc.get("text"), str):
                yield _in_vocab(_encode(tokenizer, doc["text"]), vocab_size, f"{p}:{n}")
            else:
                raise DataError(f"{p}:{n}: expected an object with a \"text\" string or an \"input_ids\" list")


def _in_vocab(ids: list[int], vocab_size: int | None, where: str) -> list[int]:
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise DataError(f"{where}: token id {max(ids)} is outside the model's vocabulary of {vocab_size}")
    return ids


def _ids(values: object, where: str) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in values):
        raise DataError(f"{where}: token ids must be a list of non-negative integers")
    return values


def _encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, LazyTokenizer):
        tokenizer = tokenizer.get()
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def block_prefix(tokenizer) -> list[int]:
    """The special tokens ``tokenizer`` puts before a text of its own (a BOS for Llama-style and
    Mixtral tokenizers; none for GPT-2-style, Qwen and byte-level ones), found by encoding a
    probe text with and without them."""
    if isinstance(tokenizer, LazyTokenizer):
        tokenizer = tokenizer.get()
    if isinstance(tokenizer, ByteTokenizer):
        return []
    probe = "Hello world"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def pack(docs: Iterator[list[int]], seq_len: int, max_tokens: int | None = None,
         eos: int | None = None, prefix: Sequence[int] = ()) -> Iterator[np.ndarray]:
    """Concatenate documents (``eos`` between them) and cut blocks of ``seq_len`` tokens; each
    block starts with ``prefix`` (a BOS: see :func:`block_prefix`) and then ``seq_len - len(prefix)``
    tokens of text.

    A final partial block is yielded only when it is the first block (tiny data sets). Stops once
    ``max_tokens`` tokens have been yielded.
    """
    buf: list[int] = []
    emitted = 0
    head = list(prefix)
    take = seq_len - len(head)
    if take < 1:
        raise DataError(f"a block of {seq_len} tokens leaves no room for text after the tokenizer's "
                        f"{len(head)} leading special token(s); use a longer --seq-len")
    text = 0  # tokens of the documents themselves, without the separators and the prefix
    for doc in docs:
        text += len(doc)
        buf.extend(doc)
        if eos is not None:
            buf.append(eos)
        while len(buf) >= take:
            if max_tokens is not None and emitted + seq_len > max_tokens:
                return
            yield np.asarray(head + buf[:take], dtype=np.int64)
            emitted += seq_len
            del buf[:take]
    if emitted == 0:
        buf = head + buf
        n = len(buf) if max_tokens is None else min(len(buf), max_tokens)
        if n < 2:
            why = (f"--max-tokens {max_tokens} leaves {n}" if max_tokens is not None and len(buf) >= 2
                   else "the data holds no text" if text == 0 else f"the data holds {count(n, 'token')}")
            raise DataError(f"{why}; at least 2 are needed (a token and the next one it predicts): give "
                            f"more text or a larger --max-tokens")
        yield np.asarray(buf[:n], dtype=np.int64)
