"""A plan read from JSON, checked once built (untrusted: plans travel between machines and
users): names that could escape the destination or the source, and numbers that are negative or
disagree with the plan's source fingerprint and headers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from core.checkpoint import CONFIG_NAME, INDEX_NAME
from core.containers import CONTAINERS
from core.errors import PlanError
from planners.plan_schema import check_name, check_written_name, is_count
from planners.provenance import PROVENANCE_NAME
from planners.tensors import OutputShard, check_segment


class PlanView(Protocol):
    """What the checks read of a :class:`planners.plan.Plan`."""

    @property
    def container(self) -> str: ...
    @property
    def source_shards(self) -> Mapping[str, Mapping[str, Any]]: ...
    @property
    def outputs(self) -> Sequence[OutputShard]: ...
    @property
    def copy_files(self) -> Sequence[str]: ...
    @property
    def skipped_files(self) -> Sequence[str]: ...
    @property
    def top_k(self) -> int: ...


def check_plan(plan: PlanView, where: str) -> None:
    """Refuse names that could escape the destination or the source, and numbers that are
    negative or disagree with the plan's source fingerprint and headers."""
    container = CONTAINERS[plan.container]
    reserved = {CONFIG_NAME, INDEX_NAME, PROVENANCE_NAME, container.index_name}
    for name, fp in plan.source_shards.items():
        check_name(name, "source shard", where)
        if not all(is_count(fp.get(k)) for k in ("size", "header_len")) or not isinstance(fp.get("header_sha256"), str):
            raise PlanError(f"{where}: source shard {name!r} needs a non-negative size and header_len and a header_sha256")
    names: set[str] = set()
    for i, o in enumerate(plan.outputs):
        check_name(o.name, "output shard", where)
        check_written_name(o.name, f"output shard name (outputs[{i}].name)", where)
        if "/" in o.name or not o.name.endswith(container.suffix) or o.name in names:
            raise PlanError(f"{where}: output shard {o.name!r} must be a unique '{container.suffix}' file "
                            f"name in the destination's top folder. Refusing this plan: make it again")
        names.add(o.name)
        for t in o.tensors:
            for s in t.segments:
                check_segment(s, plan.source_shards, f"{where}: output {o.name!r}, tensor {t.name!r}")
    for name in (*plan.copy_files, *plan.skipped_files):
        check_name(name, "file", where)
    for i, name in enumerate(plan.copy_files):
        check_written_name(name, f"copied file (copy_files[{i}])", where)
        if name in reserved or name in names or name.split("/")[0].startswith("."):
            raise PlanError(f"{where}: copied file {name!r} would replace a file this tool writes "
                            f"(or its state folder). Refusing this plan: make it again")
        if name.split("/")[0].startswith("."):
            raise PlanError(f"{where}: copied file {name!r} is hidden (a dot file, such as .env, may hold "
                            f"credentials), and plans never copy hidden files. Refusing this plan: make it again")
    if not is_count(plan.top_k) or plan.top_k == 0:
        raise PlanError(f"{where}: top_k {plan.top_k!r} must be a positive integer")
