"""Routers with some experts made unselectable, for model-level truth tests."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def added_to_linear(masks: dict):
    """While open, ``F.linear`` with a weight whose ``id`` is in ``masks`` adds that mask (a
    vector over the outputs, ``-inf`` at dropped experts) to its output: router logits of dropped
    experts at -inf, whatever the family does with them next."""
    import torch

    orig = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        out = orig(x, weight, bias)
        m = masks.get(id(weight))
        return out if m is None else out + m.to(out.dtype)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = orig
