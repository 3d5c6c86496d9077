"""Plans that carry new router bytes, for tests: the pruned routers of a plain prune, doubled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from core.checkpoint import Checkpoint
from planners.carried import carry_tensors
from planners.plan import Plan
from tests.conftest import cli

METHOD = {"kind": "router-recalibration", "objective": "layer output MSE", "tokens": 4096, "steps": 10,
          "data": [{"name": "calib.txt", "sha256": "0" * 64}]}


def doubled_bf16(raw: bytes) -> bytes:
    """Every BF16 value times two (exact: one more in the exponent)."""
    f = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32) * 2
    return (f.view(np.uint32) >> 16).astype("<u2").tobytes()


def tensor_bytes(ckpt: Path, name: str) -> bytes:
    t = Checkpoint.open(str(ckpt)).tensors[name]
    with open(ckpt / t.shard, "rb") as f:
        f.seek(t.begin)
        return f.read(t.nbytes)


def router_names(plan: Plan) -> list[str]:
    return [t.name for o in plan.outputs for t in o.tensors if ".mlp.router." in t.name]


def new_routers(plan: Plan, plain_dst: Path) -> dict[str, bytes]:
    """Each pruned router tensor of the plain prune in ``plain_dst``, doubled."""
    new = {name: doubled_bf16(tensor_bytes(plain_dst, name)) for name in router_names(plan)}
    assert all(new[n] != tensor_bytes(plain_dst, n) for n in new)
    return new


def plain_and_carried(src: Path, tmp: Path, keep: dict[str, list[int]] | None = None,
                      **plan_args: Any) -> tuple[Path, Path, dict[str, bytes]]:
    """A plain plan (run into ``tmp/plain``) and the same plan carrying doubled routers, saved
    as ``tmp/carried/plan.json`` (with its sidecar where the bytes are many)."""
    import json

    ckpt = Checkpoint.open(str(src))
    layers = ckpt.layout.moe_layers(ckpt)
    n = ckpt.layout.num_experts(ckpt.config)
    keep = keep or {str(layer): list(range(0, n, 2)) for layer in layers}
    (tmp / "keep.json").write_text(json.dumps(keep))
    plain = tmp / "plain.json"
    cli("plan", src, "--keep-list", tmp / "keep.json", "--out", plain,
        *[a for k, v in plan_args.items() for a in (f"--{k.replace('_', '-')}", v)])
    cli("run", plain, "--out", tmp / "plain", "--quiet")
    p = Plan.load(str(plain))
    new = new_routers(p, tmp / "plain")
    (tmp / "carried").mkdir(exist_ok=True)
    carry_tensors(p, new, method=METHOD).save(str(tmp / "carried" / "plan.json"))
    return plain, tmp / "carried" / "plan.json", new
