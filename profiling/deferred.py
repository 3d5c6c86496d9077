"""Layer-batched experts: a decoder layer's MoE run over the tokens of many batches at once.

Attention must see one sequence batch at a time, but routing and the experts work token by token,
so the streamed engine runs each batch through the layer with its ``mlp`` replaced by a stand-in
that keeps the MoE input and returns zeros; the layer then returns ``residual + 0``, its residual
stream. The real ``mlp`` then runs over the kept inputs of a chunk of batches (each expert sees
many more rows), and each batch is finished with ``residual + mlp_out``: the same addition, of
the same values, as the layer's own forward.

That holds only when the layer's forward ends exactly so (``h = self.mlp(h)`` or
``h, _ = self.mlp(h)``, then ``h = residual + h``, then ``return h``); :func:`deferrable` reads
the forward's source to check, and a layer written otherwise runs batch by batch as before.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch

#: Tokens per expert chunk on the CPU (RAM is not budgeted like device memory).
CPU_CHUNK = 1 << 18
#: The most tokens per chunk on any device: beyond this the expert GEMMs gain nothing.
MAX_CHUNK = 1 << 19


@cache
def _tail(cls: type) -> int | None:
    """How many values ``cls.forward`` unpacks from its single ``self.mlp(...)`` call when the
    forward ends with that call, ``h = residual + h`` and ``return h``; None otherwise."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    fn = tree.body[0]
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(fn.body) < 3:
        return None
    calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and _is_self_attr(n.func, "mlp")]
    call, add, ret = fn.body[-3:]
    if len(calls) != 1 or len(calls[0].args) != 1 or calls[0].keywords:  # the MoE takes the hidden states alone
        return None
    if not (isinstance(call, ast.Assign) and call.value is calls[0] and len(call.targets) == 1):
        return None
    target = call.targets[0]
    names = target.elts if isinstance(target, ast.Tuple) else [target]
    if not all(isinstance(n, ast.Name) for n in names):
        return None
    h = names[0].id  # type: ignore[attr-defined]
    if not (isinstance(ret, ast.Return) and _is_name(ret.value, h)):
        return None
    if not (isinstance(add, ast.Assign) and len(add.targets) == 1 and _is_name(add.targets[0], h)
            and isinstance(add.value, ast.BinOp) and isinstance(add.value.op, ast.Add)):
        return None
    sides = (add.value.left, add.value.right)
    # residual + h (either order; float addition commutes) where residual is another plain name
    if sum(_is_name(s, h) for s in sides) != 1 or not all(isinstance(s, ast.Name) for s in sides):
        return None
    return len(names) if isinstance(target, ast.Tuple) else 0


def _is_self_attr(node: ast.AST, attr: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == attr and _is_name(node.value, "self")


def _is_name(node: ast.AST | None, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def deferrable(layer: torch.nn.Module) -> bool:
    """Whether ``layer``'s MoE can be run apart from its attention (see the module docstring)."""
    return isinstance(getattr(layer, "mlp", None), torch.nn.Module) and _tail(type(layer)) is not None


class _Stash(torch.nn.Module):
    """Stands in for a layer's ``mlp``: keeps its input, returns zeros of the residual's dtype
    (so ``residual + 0`` is the residual, bit for bit) in the shape the layer unpacks."""

    def __init__(self, arity: int, dtype: torch.dtype):
        super().__init__()
        self.arity, self.dtype = arity, dtype
        self.kept: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            raise TypeError("the deferred MoE takes the hidden states only")
        self.kept.append(x)
        zero = torch.zeros((), dtype=self.dtype, device=x.device).expand(x.shape)
        return (zero, *([None] * (self.arity - 1))) if self.arity else zero


@contextmanager
def stashing(layer: torch.nn.Module, dtype: torch.dtype):
    """``layer.mlp`` replaced by a :class:`_Stash` while inside; yields the stash."""
    mlp = layer.mlp
    arity = _tail(type(layer))
    assert arity is not None, "check deferrable() first"
    stash = _Stash(arity, dtype)
    layer._modules["mlp"] = stash
    try:
        yield stash
    finally:
        layer._modules["mlp"] = mlp


def run_moe(mlp: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``mlp`` over the tokens of all ``inputs`` ([B, T, H] each) as one [1, N, H] batch, in
    order (batch, then position); its output cut back into the inputs' shapes."""
    width = inputs[0].shape[-1]
    flat = torch.cat([x.reshape(-1, width) for x in inputs]) if len(inputs) > 1 else inputs[0].reshape(-1, width)
    out = mlp(flat[None])
    out = out[0] if isinstance(out, tuple) else out
    parts = out.reshape(-1, out.shape[-1]).split([x.shape[:-1].numel() for x in inputs])
    return [p.view(*x.shape[:-1], p.shape[-1]) for p, x in zip(parts, inputs)]


def chunks(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive batch indices grouped so each group holds at most ``limit`` tokens (a batch
    larger than that alone); ``limit`` 0: one batch per group."""
    out: list[list[int]] = []
    held = 0
    for i, n in enumerate(sizes):
        if out and limit and held + n <= limit:
            out[-1].append(i)
            held += n
        else:
            out.append([i])
            held = n
    return out


def chunk_for(free: int, batch_tokens: int, per_token: int) -> int:
    """Tokens per MoE forward in ``free`` device bytes: what three quarters of them hold at
    ``per_token`` bytes each (the rest stays for hidden states), at least one batch, at most
    :data:`MAX_CHUNK`."""
    return max(batch_tokens, min(MAX_CHUNK, free * 3 // 4 // per_token))


def token_bytes(config: Any, layer: torch.nn.Module, dtype: torch.dtype) -> int:
    """Device bytes one token takes through a layer's MoE at most: its input and result, and per
    routed pair the gathered input, the up projection (with a gathered bias), the activation and
    the down projection, plus float32 output norms."""
    size = torch.tensor([], dtype=dtype).element_size()
    hidden = int(config.hidden_size)
    experts = getattr(layer.mlp, "experts", None)
    down = getattr(experts, "down_proj", None)
    inter = 4 * hidden
    if isinstance(down, torch.Tensor) and down.dim() == 3:  # [E, H, I], or [E, I, H] transposed
        inter = down.shape[-2] if getattr(experts, "is_transposed", False) else down.shape[-1]
    k = next((int(v) for a in ("num_experts_per_tok", "experts_per_token", "moe_topk")
              if isinstance(v := getattr(config, a, None), int) and v > 0), 8)
    return size * (3 * hidden + k * (2 * hidden + 5 * inter)) + 4 * k * hidden
