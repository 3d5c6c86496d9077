"""The end of a run: what is written after the last shard, the index last."""

from __future__ import annotations

import json
from collections.abc import Iterable

from core.storage import Storage
from planners.plan import PROVENANCE_NAME, Plan
from rewriter.exec.dest import JOURNAL, Destination, ShardResult
from rewriter.exec.publish import CARD_NAME, write_model_card


def finalize(plan: Plan, src: Storage, dst: Destination, results: Iterable[ShardResult], buffer_bytes: int) -> None:
    """Config, other files and provenance, then the index last, then drop the run state."""
    by_name = {r.name: r for r in results}
    for name, data in plan.metadata_files().items():
        dst.put_bytes(name, data)
    for name in plan.copy_files:
        if name != CARD_NAME:  # the source's card is kept under another name by write_model_card
            dst.copy_small_file(src, name, buffer_bytes)
    write_model_card(plan, src, dst, buffer_bytes)
    provenance = {
        "format": "moe-rewriter-provenance",
        "plan_digest": plan.digest,
        "source": plan.published_json()["source"]["url"],
        "family": plan.family,
        "expert_mapping": plan.expert_mapping(),
        "top_k": plan.top_k,
        "skipped_files": list(plan.skipped_files),
        "shards": {o.name: by_name[o.name].record() for o in plan.outputs},
        "plan": plan.published_json(),
        # Which tensors are new bytes (not the source's), their sha256 and how they were made.
        **({"carried": {"method": dict(plan.carried.method), "tensors": dict(plan.carried.tensors)}}
           if plan.carried is not None else {}),
    }
    dst.put_bytes(PROVENANCE_NAME, (json.dumps(provenance, indent=1, sort_keys=True) + "\n").encode())
    dst.put_bytes(plan.index_name, plan.index_json())
    # The journal goes first: once it is gone the output counts as complete, so a run killed while
    # the rest of the state folder goes is finished by the next run without hashing every shard.
    dst.remove(JOURNAL)
    dst.remove_state()
