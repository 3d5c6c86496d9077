"""The output's model card: ``README.md`` in the Hugging Face Hub's conventions.

YAML front matter (``base_model``, ``library_name``, ``tags``, ``pipeline_tag``) and a body that
says what was pruned, which experts each layer kept, the policy, saliency provenance and digests,
the serving targets checked, and — when given — verify status and eval results. ``pruning.json``
stays the machine-readable record; the card is rendered from the plan it holds.

A source model card is never overwritten: the source's ``README.md`` is kept as
``README.base.md`` (the first free name ``README.base[.N].md``) and the card links to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from core import jsonfile
from core.checkpoint import INDEX_NAME
from core.errors import CardError
from core.gguf_model import INDEX_NAME as GGUF_INDEX_NAME
from core.storage import Storage
from planners.plan import CARD_NAME, PROVENANCE_NAME, Plan, source_card
from rewriter.exec.dest import Destination, DestinationLock
from rewriter.exec.publish.hubmeta import (
    check_base_model,
    file_name,
    hub_id,
    read_head,
    source_license,
    source_name,
)
from rewriter.exec.publish.verify import load_provenance_plan


def _yaml_scalar(v: str) -> str:
    return json.dumps(v)  # a JSON string is a valid YAML double-quoted scalar


def front_matter(plan: Plan, base_model: str | None, license_fields: Mapping[str, str] | None = None) -> str:
    tags = ["moe", "expert-pruning", "moe-rewriter", plan.family]
    quant = plan.config.get("quantization_config")
    if isinstance(quant, dict) and isinstance(quant.get("quant_method"), str):
        tags.append(quant["quant_method"])
    lines = ["---"]
    if base_model:
        lines.append(f"base_model: {_yaml_scalar(base_model)}")
    lines += [f"{k}: {_yaml_scalar(v)}" for k, v in (license_fields or {}).items()]
    # The Hub files GGUF models under the gguf library (llama.cpp and the runtimes that read it).
    lines.append(f"library_name: {'gguf' if plan.container == 'gguf' else 'transformers'}")
    if plan.container == "gguf":
        tags.append("gguf")
    archs = plan.config.get("architectures") or []
    if plan.container == "gguf" or any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs):
        lines.append("pipeline_tag: text-generation")
    lines.append("tags:")
    lines += [f"- {_yaml_scalar(t)}" for t in tags]
    lines.append("---")
    return "\n".join(lines)


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def _summary(plan: Plan, base_model: str | None, base_card: str | None) -> list[str]:
    prov = plan.provenance
    src_n, src_k = prov.get("source_experts_per_layer"), prov.get("source_top_k")
    counts = sorted({len(v) for v in plan.keep.values()})
    kept = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]} (differs per layer)"
    what = ("a soft prune: every expert is still stored; dropped experts' router bias entries are set so they are "
            "never selected" if plan.soft else "a structural prune: dropped experts' tensors are removed and the "
            "kept ones renumbered 0..k-1 in order of their original ids")
    lines = [f"# {(base_model or 'MoE checkpoint').split('/')[-1]}, experts pruned", "",
             f"Made from `{source_name(plan, base_model)}` by moe-rewriter: {what}.", "",
             *_table(("", "source", "this checkpoint"), [
                 ("family", plan.family, plan.family),
                 ("experts per MoE layer", src_n, src_n if plan.soft else kept),
                 ("routing top-k", src_k, plan.top_k),
                 ("MoE layers", len(plan.keep), len(plan.keep)),
                 ("tensor bytes", "", f"{plan.total_size:,}"),
             ]), ""]
    if base_card:
        lines += [f"The source's own model card is kept as [`{base_card}`]({base_card}).", ""]
    return lines


def _kept_experts(plan: Plan) -> list[str]:
    rows = [(layer, len(ids), ", ".join(map(str, ids))) for layer, ids in sorted(plan.keep.items())]
    note = ("Original expert ids kept in each layer; in this checkpoint expert `i` of a layer is the `i`-th id listed."
            if not plan.soft else "Original expert ids left selectable in each layer (ids are unchanged).")
    return ["## Kept experts per layer", "", note, "", *_table(("layer", "kept", "original ids"), rows), ""]


#: A method kind the card may name in its sentence; any other (control characters, backticks, line
#: breaks: the plan is untrusted) is shown only inside the escaped JSON below it.
_PLAIN_KIND = re.compile(r"[A-Za-z0-9][\w.+-]{0,63}", re.ASCII)


def _carried(plan: Plan) -> list[str]:
    """Which tensors are new (not the source's bytes) and how they were made, in plain words."""
    if plan.carried is None:
        return []
    method = dict(plan.carried.method)
    kind = method.get("kind")
    how = ("router recalibration: each MoE layer's router (the kept experts' rows, and its bias where the family "
           "has one) was fitted so that the pruned layer's output matches the original layer's on calibration "
           "tokens" if kind == "router-recalibration" else f"`{kind}`" if isinstance(kind, str) and _PLAIN_KIND.fullmatch(kind)
           else "the method below")
    planned = {t.name: t for o in plan.outputs for t in o.tensors}
    rows = [(f"`{name}`", planned[name].dtype, "×".join(map(str, planned[name].shape)), f"`{sha}`")
            for name, sha in plan.carried.tensors.items() if name in planned]
    return ["## New tensors", "",
            f"{len(rows)} tensor{'s' if len(rows) != 1 else ''} of this checkpoint {'are' if len(rows) != 1 else 'is'} "
            f"new: not copied from the source but made by {how}. Every other tensor, every expert's included, holds "
            f"the source's bytes unchanged. `rewriter verify` checks each new tensor against the sha256 below, "
            f"recorded in `{PROVENANCE_NAME}`.", "",
            *_table(("tensor", "dtype", "shape", "sha256"), rows), "",
            "How they were made:", "", "```json", json.dumps(method, indent=1, sort_keys=True), "```", ""]


def _policy(plan: Plan) -> list[str]:
    prov = plan.provenance
    lines = ["## Policy and saliency", ""]
    if isinstance(prov.get("policy"), dict):
        lines += ["Policy:", "", "```json", json.dumps(prov["policy"], indent=1, sort_keys=True), "```", ""]
    if plan.config_patch:
        lines += ["Changed in `config.json` (every other field is the source's):", "", "```json",
                  json.dumps(dict(plan.config_patch), indent=1, sort_keys=True), "```", ""]
    sal = prov.get("saliency")
    if isinstance(sal, list) and sal:
        lines += _table(("saliency file", "domain", "weight", "tokens", "sha256"),
                        [(file_name(s.get("path")), s.get("domain"), s.get("weight"), s.get("tokens"), f"`{s.get('sha256')}`")
                         for s in sal if isinstance(s, dict)]) + [""]
    kl = prov.get("keep_list")
    if isinstance(kl, dict):
        lines += [f"Experts chosen by an explicit keep list `{file_name(kl.get('path'))}` (sha256 `{kl.get('sha256')}`).", ""]
    lines += [f"Plan digest: `{plan.digest}`. `{PROVENANCE_NAME}` holds the whole plan, the expert mapping and every "
              f"shard's sha256.", ""]
    return lines


def _serving(plan: Plan, verdicts: Sequence[Mapping[str, Any]] | None, checked: bool) -> list[str]:
    lines = ["## Serving targets", ""]
    if not verdicts:
        return lines + ["No serving target was checked; run `rewriter check . --target vllm` (docs/serving.md).", ""]
    by_target: dict[str, list[Mapping[str, Any]]] = {}
    for v in verdicts:
        by_target.setdefault(str(v.get("target")), []).append(v)
    rows = []
    for t, vs in by_target.items():
        fails = [f"{v.get('rule')}: {v.get('message')}" for v in vs if v.get("status") == "fail"]
        warns = [f"{v.get('rule')}: {v.get('message')}" for v in vs if v.get("status") == "warn"]
        rows.append((t, "rejects" if fails else "accepts", "; ".join(fails + warns) or "—"))
    how = "checked when the plan was made (`--target`)" if checked else "evaluated from the plan (no `--target` was given)"
    return lines + [f"Rules of docs/serving.md, {how}.", "", *_table(("target", "verdict", "notes"), rows), ""]


def _verify(verify: Mapping[str, Any] | None, source: str) -> list[str]:
    lines = ["## Verification", ""]
    if verify is None:
        return lines + ["Not recorded here. `rewriter verify SRC .` re-reads every tensor and compares it with its "
                        "planned source bytes; `rewriter card . --verify` records the result in this card.", ""]
    status = "OK" if verify.get("ok") else "FAILED"
    return lines + [f"`rewriter verify` against `{source}`: {verify.get('tensors_checked')} tensors, "
                    f"{verify.get('bytes_checked'):,} bytes, {len(verify.get('mismatches') or [])} mismatches, "
                    f"{len(verify.get('problems') or [])} problems -> **{status}**.", ""]


def _eval(result: Mapping[str, Any] | None) -> list[str]:
    if result is None:
        return []
    base = result.get("base")
    head = ["pack", "seq len", "tokens", "ppl", "mean p", "cc rate"] + (["Δppl", "gates"] if base else [])
    rows = []
    for r in result["rows"]:
        row = [r.get("pack"), r.get("seq_len"), r.get("tokens"), _num(r.get("ppl")), _num(r.get("mean_p")),
               _num(r.get("cc_rate"))]
        if base:
            c = r.get("check") or {}
            row += [_num(c.get("d_ppl")), "pass" if c.get("pass") else "fail"]
        rows.append(row)
    lines = ["## Evaluation", "", "`rewriter eval` of this checkpoint" + (f" against `{file_name(base)}`" if base else "") + ":",
             "", *_table(head, rows), ""]
    if base and "pass" in result:
        lines += [f"Near-lossless gates: **{'pass' if result['pass'] else 'fail'}** (docs/eval.md).", ""]
    return lines


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def render_card(plan: Plan, *, base_model: str | None = None, verify: Mapping[str, Any] | None = None,
                eval_result: Mapping[str, Any] | None = None, source_card_text: str | None = None) -> str:
    """The whole ``README.md`` for ``plan``'s output.

    Args:
        base_model: the source's Hub id (default: :func:`hub_id`); omitted from the front matter
            when unknown, since the Hub expects a repo id there.
        verify: a ``rewriter verify --json`` report to record.
        eval_result: a ``rewriter eval --json`` result (checked with :func:`check_eval`).
        source_card_text: the source's model card, whose licence fields the new card carries.
    """
    base_model = base_model or hub_id(plan)
    serving = plan.provenance.get("serving")
    if isinstance(serving, dict) and isinstance(serving.get("verdicts"), list):
        verdicts, checked = serving["verdicts"], True
    else:
        from core.layouts import LAYOUTS
        from planners.serving import TARGETS, check_facts
        from planners.serving_facts import plan_facts

        layout = next(lay for lay in LAYOUTS if lay.family == plan.family)
        verdicts, checked = [v.to_json() for v in check_facts(plan_facts(plan, layout), TARGETS)], False
    body = [*_summary(plan, base_model, source_card(plan)), *_kept_experts(plan), *_carried(plan), *_policy(plan),
            *_serving(plan, verdicts, checked), *_verify(verify, source_name(plan, base_model, verify and verify.get("src"))), *_eval(eval_result),
            "## Publishing", "", "This folder is what the Hub expects; upload it with huggingface_hub's CLI:", "",
            "```bash", "hf upload OWNER/NAME .", "```", ""]
    return front_matter(plan, base_model, source_license(source_card_text)) + "\n\n" + "\n".join(body)


def check_eval(doc: Any, where: str) -> Mapping[str, Any]:
    """Validate an eval result (untrusted input): an object with ``rows`` of per-pack objects."""
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise CardError(f"{where}: expected the JSON that `rewriter eval --json` writes (an object with a non-empty "
                        f"'rows' list); found {type(doc).__name__}{' without rows' if isinstance(doc, dict) else ''}")
    for i, r in enumerate(rows):
        if not isinstance(r.get("pack"), str) or not isinstance(r.get("ppl"), (int, float)):
            raise CardError(f"{where}: rows[{i}] needs a 'pack' name and a numeric 'ppl' (found {sorted(r)[:6]})")
    return doc


def write_model_card(plan: Plan, src: Storage, dst: Destination, buffer_bytes: int) -> None:
    """Keep the source's card under its base name, then write this checkpoint's ``README.md``."""
    base = source_card(plan)
    if base:
        dst.copy_small_file(src, CARD_NAME, buffer_bytes, dst_name=base)
    text = read_head(src, CARD_NAME) if base else None
    dst.put_bytes(CARD_NAME, render_card(plan, source_card_text=text).encode())


def load_eval(path: str) -> Mapping[str, Any]:
    """Read and check a ``rewriter eval --json`` result file."""
    try:
        with open(path, "rb") as f:
            doc = jsonfile.loads(f.read())
    except FileNotFoundError:
        raise CardError(f"{path}: eval result not found; write one with `rewriter eval MODEL ... --json > {path}`") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CardError(f"{path}: not a readable JSON eval result ({e})") from None
    return check_eval(doc, path)


def update_card(dst: Destination, *, base_model: str | None = None, verify: Mapping[str, Any] | None = None,
                eval_result: Mapping[str, Any] | None = None) -> Plan:
    """Render ``README.md`` of a complete output again from its ``pruning.json``, with the extras given.

    Raises:
        CardError: ``dst`` holds no complete output of this tool.
        PlanError: its ``pruning.json`` is unreadable.
    """
    if not dst.exists(INDEX_NAME) and not dst.exists(GGUF_INDEX_NAME):
        raise CardError(f"{dst.url}: no {INDEX_NAME}, so no complete output to describe; finish the run first")
    plan = load_provenance_plan(dst.storage)
    base = source_card(plan)
    text = read_head(dst.storage, base) if base and dst.exists(base) else None
    card = render_card(plan, base_model=base_model and check_base_model(base_model), verify=verify,
                       eval_result=eval_result, source_card_text=text).encode()
    # Written like a run writes (under the lock, through a temporary file), and like a finished
    # run it leaves no state behind: the output stays exactly what the Hub expects.
    with DestinationLock(dst.storage):
        try:
            dst.put_bytes(CARD_NAME, card)
        finally:
            dst.drop_empty_state(created=False)
    return plan
