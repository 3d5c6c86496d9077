"""The quality benchmark's report: means and 95 % intervals over seeds, paired differences.

The unit of replication is the training seed. A cell (rank, keep, calibration) holds one run per
training seed and calibration seed; each training seed contributes the mean over its
calibration draws, and the cell reports the mean of those and a two-sided 95 % Student-t
interval (``t(0.975, n-1) x sd / sqrt(n)``, ``n`` training seeds). Differences between two
rankings are paired (same model, same calibration halves, same problems): the interval of the
per-seed differences that excludes 0 marks a difference outside the noise.

Task recovery is the pruned model's exact-match accuracy over its own base model's accuracy;
``byte`` is the teacher-forced accuracy of the answer's bytes (:mod:`quality.tasks`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

#: Two-sided 95 % quantiles of Student's t by degrees of freedom (1..30); normal beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
PACKS = ("code", "prose", "arith", "union")
TASKS = ("arith", "code")
#: The metrics whose paired differences are reported.
METRICS = ("ppl_union", "acc_arith", "byte_arith", "acc_code", "byte_code")
#: Rankings whose plans are also recalibrated (``<rank>+recal``).
RECAL_RANKS = ("freq", "reap", "eaft_reap")


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95 % t-interval (half-width NaN for one value)."""
    if any(v != v for v in values):
        return math.nan, math.nan
    mean = statistics.fmean(values)
    n = len(values)
    if n < 2:
        return mean, math.nan
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(n)


def _metrics(run: dict[str, Any], base_tasks: dict[str, float]) -> dict[str, float]:
    m = {f"ppl_{p}": run["packs"][p]["ppl"] for p in PACKS}
    for t in TASKS:
        m[f"acc_{t}"] = run["tasks"][t]
        m[f"rec_{t}"] = run["tasks"][t] / base_tasks[t] if base_tasks[t] > 0 else math.nan
        if "task_bytes" in run:
            m[f"byte_{t}"] = run["task_bytes"][t]
    return m


def _key(run: dict[str, Any]) -> tuple[str, int, str]:
    return run["rank"], run["keep"], run["calibration"]


def per_seed(doc: dict[str, Any]) -> dict[tuple[str, int, str], dict[int, dict[str, float]]]:
    """cell -> training seed -> metric -> mean over that seed's calibration draws."""
    acc: dict[tuple, dict[int, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    for sd in doc["seeds"]:
        for run in sd["runs"]:
            acc[_key(run)][sd["seed"]].append(_metrics(run, sd["base"]["tasks"]))
    return {cell: {s: {k: statistics.fmean(r[k] for r in rs) for k in rs[0]} for s, rs in seeds.items()}
            for cell, seeds in acc.items()}


def cells(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each cell's mean and 95 % half-width per metric, in the order the runs were made."""
    seeds = per_seed(doc)
    out = []
    for cell, by_seed in seeds.items():
        values = list(by_seed.values())
        stats = {k: t_interval([v[k] for v in values]) for k in values[0]}
        out.append({"rank": cell[0], "keep": cell[1], "calibration": cell[2], "seeds": len(values), "metrics": stats})
    return out


def paired(doc: dict[str, Any], a: tuple[str, int, str], b: tuple[str, int, str], metric: str) -> tuple[float, float] | None:
    """Mean and 95 % half-width of ``a - b`` over training seeds (``None`` if a cell is absent)."""
    seeds = per_seed(doc)
    if a not in seeds or b not in seeds:
        return None
    common = sorted(set(seeds[a]) & set(seeds[b]))
    if not common or metric not in seeds[a][common[0]]:
        return None
    return t_interval([seeds[a][s][metric] - seeds[b][s][metric] for s in common])


def comparisons(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The ranking differences worth asking about, each with its paired interval and verdict."""
    keeps = sorted({r["keep"] for sd in doc["seeds"] for r in sd["runs"]}, reverse=True)
    calibs = list(dict.fromkeys(r["calibration"] for sd in doc["seeds"] for r in sd["runs"] if r["calibration"] != "-"))
    pairs = []
    for n in keeps:
        for c in calibs:
            pairs += [((x, n, c), (y, n, c)) for x, y in (("eaft_reap", "reap"), ("eaft_reap", "freq"), ("reap", "freq"))]
        pairs += [((x, n, "union"), ("random", n, "-")) for x in ("freq", "reap", "eaft_reap")]
        pairs += [((f"{x}+outliers", n, "union"), (x, n, "union")) for x in ("reap", "eaft_reap")]
        pairs += [((f"{x}+recal", n, c), (x, n, c)) for c in calibs for x in RECAL_RANKS]
        pairs += [(("random+recal", n, "-"), ("random", n, "-"))]
    out = []
    for a, b in pairs:
        for metric in METRICS:
            r = paired(doc, a, b, metric)
            if r is None:
                continue
            mean, half = r
            out.append({"a": a, "b": b, "metric": metric, "diff": mean, "half": half,
                        "significant": bool(half == half and abs(mean) > half)})
    return out


def recalibration(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per recalibrated cell: union perplexity of the plain and the recalibrated prune, the share
    of the perplexity lost by pruning that recalibration recovered (``(plain - recal) / (plain -
    base)`` per training seed, 95 % t-interval) and the mean held-out relative MSE of the fit
    before and after, with the share of layers that took new router rows."""
    seeds = per_seed(doc)
    base = {sd["seed"]: sd["base"]["ppl"]["union"] for sd in doc["seeds"]}
    fits: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for sd in doc["seeds"]:
        for r in sd["runs"]:
            fits[_key(r)] += list(r.get("recal", {}).values())
    out = []
    for cell, by_seed in seeds.items():
        plain = (cell[0].removesuffix("+recal"), cell[1], cell[2])
        if not cell[0].endswith("+recal") or plain not in seeds:
            continue
        common = sorted(set(by_seed) & set(seeds[plain]))
        share = [(seeds[plain][s]["ppl_union"] - by_seed[s]["ppl_union"]) / (seeds[plain][s]["ppl_union"] - base[s])
                 if seeds[plain][s]["ppl_union"] != base[s] else math.nan for s in common]
        f = fits[cell]
        out.append({"rank": plain[0], "keep": cell[1], "calibration": cell[2],
                    "ppl_plain": t_interval([seeds[plain][s]["ppl_union"] for s in common]),
                    "ppl_recal": t_interval([by_seed[s]["ppl_union"] for s in common]),
                    "recovered": t_interval(share),
                    "mse_before": statistics.fmean(x["mse_before"] for x in f) if f else math.nan,
                    "mse_after": statistics.fmean(x["mse_after"] for x in f) if f else math.nan,
                    "layers_changed": statistics.fmean(bool(x["accepted"]) for x in f) if f else math.nan})
    return out


def _recal_lines(doc: dict[str, Any], n_exp: int) -> list[str]:
    rows = recalibration(doc)
    if not rows:
        return []
    st = doc["scale_settings"].get("recal", {})
    lines = ["## Router recalibration against the plain prune",
             "",
             f"`+recal`: the same plan with its routers refitted (`rewriter recalibrate`: {st.get('steps')} Adam "
             f"steps per layer on {st.get('tokens_per_layer')} sampled tokens of the {st.get('data')}); paired "
             f"differences are in the table above. Recovered: the share of the union perplexity lost by pruning "
             f"that recalibration won back, per training seed (1 = back to the base model). Fit: the held-out "
             f"relative MSE of the MoE layers' output, mean over layers, seeds and draws, before -> after, and "
             f"the share of layers that took new rows.",
             "",
             "| rank | keep | calibration | union ppl plain | union ppl recal | recovered | fit MSE | layers changed |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rank']} | {r['keep']} ({r['keep'] / n_exp:.1%}) | {r['calibration']} | "
                     f"{_pm(r['ppl_plain'])} | {_pm(r['ppl_recal'])} | {_pm(r['recovered'], 2)} | "
                     f"{r['mse_before']:.3f} -> {r['mse_after']:.3f} | {r['layers_changed']:.0%} |")
    return lines


def forced_outliers(doc: dict[str, Any]) -> dict[tuple[str, int], float]:
    """Per (outlier rank, keep): mean experts per layer that ``--keep-outliers`` kept and the plain
    ranking dropped (same seed, calibration draw and keep count)."""
    plain = {(sd["seed"], r["calib_seed"], r["rank"], r["keep"]): r["keep_sets"]
             for sd in doc["seeds"] for r in sd["runs"] if r["calibration"] == "union"}
    acc: dict[tuple[str, int], list[float]] = defaultdict(list)
    for (seed, c, rank, keep), sets in plain.items():
        base = plain.get((seed, c, rank.removesuffix("+outliers"), keep))
        if rank.endswith("+outliers") and base is not None:
            acc[(rank, keep)] += [len(set(v) - set(base[k])) for k, v in sets.items()]
    return {k: statistics.fmean(v) for k, v in acc.items()}


def stability_table(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean Jaccard overlap of the A/B keep sets per (domain, rank, keep), interval over training seeds."""
    acc: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for sd in doc["seeds"]:
        for r in sd["stability"]:
            acc[(r["domain"], r["rank"], r["keep"])][sd["seed"]].append(r["mean_jaccard"])
    return [{"domain": k[0], "rank": k[1], "keep": k[2],
             "jaccard": t_interval([statistics.fmean(v) for v in by_seed.values()])} for k, by_seed in acc.items()]


def _pm(stat: tuple[float, float], digits: int = 3) -> str:
    mean, half = stat
    if mean != mean:
        return "-"
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if half == half else f"{mean:.{digits}f}"


def _steps(seeds: list[dict[str, Any]]) -> str:
    steps = [sd["training"]["steps"] for sd in seeds]
    return str(steps[0]) if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}"


def _reused(doc: dict[str, Any]) -> bool:
    return any(sd["training"].get("reused") for sd in doc["seeds"])


def _seed_runs(doc: dict[str, Any]) -> str:
    """How the seeds ran: side by side, and whether an earlier run (--train-only) trained them."""
    n, jobs = len(doc["seeds"]), doc["hardware"]["jobs"]
    if _reused(doc):
        return (f"{n} training seeds, their models trained by an earlier run (--train-only) and evaluated "
                f"here as {jobs} concurrent process(es)")
    return f"{n} training seeds run as {jobs} concurrent process(es)"


def _how_trained(seeds: list[dict[str, Any]]) -> str:
    """How the training step ran (compiled or not, attention and experts), where recorded."""
    tr = seeds[0]["training"]
    if "compiled" not in tr:
        return ""
    comp = [sd["training"].get("compile_seconds", 0.0) for sd in seeds]
    how = (f"compiled (torch.compile, {min(comp):.0f}-{max(comp):.0f} s of it the first step)"
           if all(sd["training"].get("compiled") for sd in seeds) else "uncompiled")
    budget = tr.get("budget_seconds")
    limit = f", a budget of {budget:.0f} s after the first step" if budget else ""
    return f" ({how}, {tr.get('attention')} attention, {tr.get('experts')} experts{limit})"


def markdown(doc: dict[str, Any]) -> str:
    first = doc["seeds"][0]
    tr, sz = first["training"], first["training"]["size"]
    n_exp = sz["experts"]
    st = doc["scale_settings"]
    base = {p: t_interval([sd["base"]["ppl"][p] for sd in doc["seeds"]]) for p in PACKS}
    base_acc = {t: t_interval([sd["base"]["tasks"][t] for sd in doc["seeds"]]) for t in TASKS}
    has_bytes = all("task_bytes" in sd["base"] for sd in doc["seeds"])
    train_s = [sd["seconds"]["train"] for sd in doc["seeds"]]
    draws = ", ".join(f"seed {sd['seed']}: {len(sd['calib_seeds_done'])}" for sd in doc["seeds"])
    lines = [
        f"# Pruning quality on the reference MoE ({doc['date']}, scale `{doc['scale']}`)",
        "",
        f"Hardware: {doc['hardware']['device']}, torch {doc['hardware']['torch']}, transformers "
        f"{doc['hardware']['transformers']}; {_seed_runs(doc)}. Model: gpt-oss architecture, {sz['layers']} layers x {n_exp} experts, "
        f"top-{sz['top_k']}, hidden {sz['hidden']}, byte-level, {tr['params'] / 1e6:.1f} M parameters; "
        f"{_steps(doc['seeds'])} steps of {tr['batch_size']} x {tr['seq_len']} tokens per seed, training "
        f"{min(train_s):.0f}-{max(train_s):.0f} s per seed{_how_trained(doc['seeds'])}, final training loss "
        + ", ".join(f"{sd['training']['final_loss']:.3f}" for sd in doc["seeds"])
        + f". Whole benchmark: {doc['wall_seconds']:.0f} s wall clock"
        + (" (evaluation only: training was the earlier run's)." if _reused(doc) else "."),
        "",
        f"Seeds: training {st['seeds']}, calibration draws {st['calib_seeds']} (each draw: the domain's "
        f"calibration documents shuffled and halved; half A, at most {st['calib_tokens_per_half']:,} tokens, "
        f"plans the pruning). Each cell: mean ± half-width of the 95 % Student-t interval over the "
        f"{len(doc['seeds'])} training seeds, each seed the mean of its calibration draws "
        f"({draws}). "
        f"Perplexity on {st['eval_blocks']} blocks of {st['seq_len']} bytes per evaluation domain; `acc` is the "
        f"exact-match accuracy of greedy generation on held-out problems ({first['task_problems']['arith']} "
        f"answers of arithmetic problems never trained on, {first['task_problems']['code']} second halves of "
        f"lines of code), `rec` the recovery (pruned / base accuracy of the same seed)"
        + (", `byte` the teacher-forced accuracy of the answers' bytes" if has_bytes else "")
        + f". `+outliers` keeps experts whose maximum activation norm has a z-score above {st['outlier_z']}.",
        "",
        "Base: " + ", ".join(f"{p} ppl {_pm(base[p])}" for p in PACKS) + "; "
        + ", ".join(f"{t} acc {_pm(base_acc[t])}" for t in TASKS) + ".",
        *([""] + _base_task_lines(doc) if has_bytes else []),
        "",
        "| rank | keep | calibration | " + " | ".join(f"{p} ppl" for p in PACKS)
        + "".join(f" | {t} acc | {t} rec" + (f" | {t} byte" if has_bytes else "") for t in TASKS) + " |",
        "|---|---:|---|" + "---:|" * (len(PACKS) + (3 if has_bytes else 2) * len(TASKS)),
    ]
    for c in cells(doc):
        m = c["metrics"]
        lines.append(f"| {c['rank']} | {c['keep']} ({c['keep'] / n_exp:.1%}) | {c['calibration']} | "
                     + " | ".join(_pm(m[f"ppl_{p}"]) for p in PACKS) + " | "
                     + " | ".join(f"{_pm(m[f'acc_{t}'])} | {_pm(m[f'rec_{t}'], 2)}"
                                  + (f" | {_pm(m[f'byte_{t}'])}" if has_bytes else "") for t in TASKS) + " |")
    forced = forced_outliers(doc)
    if forced:
        lines += ["", "Experts per layer that `--keep-outliers` kept although the plain ranking dropped them: "
                  + ", ".join(f"{r} keep {k}: {v:.2f}" for (r, k), v in forced.items()) + "."]
    short = [sd for sd in doc["seeds"] if len(sd["calib_seeds_done"]) < len(st["calib_seeds"])]
    missing = sorted(set(st["seeds"]) - {sd["seed"] for sd in doc["seeds"]})
    if missing:
        lines += ["", f"Training seeds {missing} finished no calibration draw before the deadline and are not in "
                  f"the table; its intervals are over {len(doc['seeds'])} seed(s)."]
    if short:
        lines += ["", f"The run stopped at its deadline: {len(short)} training seed(s) finished fewer than the "
                  f"{len(st['calib_seeds'])} calibration draws asked for ({draws}); their cells average the draws "
                  f"that finished."]
    recal = _recal_lines(doc, n_exp)
    lines += ["", *_comparison_lines(doc), *([""] + recal if recal else []), "", *_stability_lines(doc, n_exp), "", "Corpora (sha256, bytes):", ""]
    lines += [f"- `{k}`: {v['bytes']:,} bytes, {v['documents']} documents, `{v['sha256'][:16]}`"
              for k, v in doc["corpora"].items()]
    return "\n".join(lines) + "\n"


def _base_task_lines(doc: dict[str, Any]) -> list[str]:
    """The base models' task accuracy, overall and per kind of problem: exact match and answer bytes."""
    rows = ["| task | kind | problems | base acc | base byte |", "|---|---|---:|---:|---:|"]
    seeds = doc["seeds"]
    for t in TASKS:
        kinds = seeds[0]["base"]["task_kinds"][t]
        for kind in ["all", *(sorted(kinds) if len(kinds) > 1 else [])]:
            got = [sd["base"]["task_kinds"][t][kind] if kind != "all" else
                   {"accuracy": sd["base"]["tasks"][t], "byte_accuracy": sd["base"]["task_bytes"][t]} for sd in seeds]
            n = seeds[0]["task_problems"][t] if kind == "all" else seeds[0]["task_kind_problems"][t][kind]
            rows.append(f"| {t} | {kind} | {n} | {_pm(t_interval([g['accuracy'] for g in got]))} | "
                        f"{_pm(t_interval([g['byte_accuracy'] for g in got]))} |")
    return rows


def _comparison_lines(doc: dict[str, Any]) -> list[str]:
    comps = comparisons(doc)
    metrics = METRICS
    sig = [c for c in comps if c["significant"]]
    by_pair: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for c in comps:
        by_pair[(c["a"], c["b"])][c["metric"]] = c
    lines = ["## Which differences are outside the noise",
             "",
             f"Paired differences a - b (per training seed, 95 % t-interval); **bold**: the interval excludes 0 "
             f"({len(sig)} of {len(comps)} differences). Lower perplexity and higher accuracy are better.",
             "",
             "| a | b | keep | calibration | union ppl | arith acc | arith byte | code acc | code byte |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for (a, b), row in by_pair.items():
        cols = []
        for m in metrics:
            c = row.get(m)
            text = "-" if c is None else _pm((c["diff"], c["half"]))
            cols.append(f"**{text}**" if c is not None and c["significant"] else text)
        lines.append(f"| {a[0]} | {b[0]} | {a[1]} | {a[2]} | " + " | ".join(cols) + " |")
    return lines


def _stability_lines(doc: dict[str, Any], n_exp: int) -> list[str]:
    lines = ["## Keep-set stability",
             "",
             "Mean per-layer Jaccard overlap of the keep sets planned from calibration halves A and B "
             "(disjoint documents), 95 % t-interval over training seeds.",
             "",
             "| domain | rank | keep | Jaccard |", "|---|---|---:|---:|"]
    for r in stability_table(doc):
        lines.append(f"| {r['domain']} | {r['rank']} | {r['keep']} ({r['keep'] / n_exp:.1%}) | {_pm(r['jaccard'])} |")
    return lines


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_exp = doc["seeds"][0]["training"]["size"]["experts"]
    panels = [("ppl_union", "union perplexity", True), ("rec_arith", "arithmetic recovery", False),
              ("rec_code", "code recovery", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    table = cells(doc)
    for ax, (metric, title, log) in zip(axes[0], panels):
        for rank in ("freq", "reap", "eaft_reap", "eaft_reap+outliers", "random"):
            rows = sorted((c for c in table if c["rank"] == rank and c["calibration"] in ("union", "-")),
                          key=lambda c: c["keep"])
            if not rows:
                continue
            ys = [c["metrics"][metric] for c in rows]
            ax.errorbar([c["keep"] / n_exp for c in rows], [y[0] for y in ys],
                        yerr=[0 if y[1] != y[1] else y[1] for y in ys], marker="o", capsize=3, label=rank)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("share of experts kept")
        ax.set_title(f"{title} (union calibration, 95 % CI)")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (JSON ``null``): strict JSON has no such
    numbers, and jq and JavaScript refuse a file that holds them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write(doc: dict[str, Any], results: Path, stem: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    doc = {**doc, "cells": [{**c, "metrics": {k: list(v) for k, v in c["metrics"].items()}} for c in cells(doc)],
           "comparisons": comparisons(doc), "recalibration": recalibration(doc)}
    (results / f"{stem}.json").write_text(json.dumps(strict_json(doc), indent=1, allow_nan=False) + "\n")
    (results / f"{stem}.md").write_text(markdown(doc))
    try:
        chart(doc, results / f"{stem}.png")
    except ImportError:  # matplotlib is optional: `python -m quality.report` draws it later
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m quality.report RESULT.json [--results DIR]``: the report again from a result file."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m quality.report")
    ap.add_argument("result", type=Path)
    ap.add_argument("--results", type=Path, default=None)
    args = ap.parse_args(argv)
    doc = json.loads(args.result.read_text())
    write(doc, args.results or args.result.parent, args.result.stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
