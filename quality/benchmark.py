"""The quality benchmark: train the reference MoE, profile per domain, prune with each ranking at
several keep fractions and calibrations, and evaluate every pruned model against the original.

``python -m quality.benchmark [--size full|toy] [--device cuda] [--work DIR] [--results DIR]``

Everything runs through the project's own code: :func:`profiling.profile.profile` (saliency),
:func:`planners.policies.select_keep` and :func:`planners.plan.build_plan` (planning),
:func:`rewriter.exec.executor.execute` (the rewrite) and :func:`quality.evaluate.evaluate` (the
harness and its gates). ``random`` keeps a seeded random set of the same size per layer.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quality.refmoe import DOMAINS, ModelSize, build_corpora, train

RESULTS = Path(__file__).resolve().parent / "results"
RANKS = ("freq", "reap", "eaft_reap")


@dataclass(frozen=True)
class Scale:
    size: ModelSize
    corpus_bytes: int
    steps: int
    seq_len: int
    batch_size: int
    keep_fracs: tuple[float, ...]
    calibrations: tuple[str, ...]
    calib_tokens: int
    eval_blocks: int


SCALES = {
    "full": Scale(ModelSize(), 4_000_000, 3000, 512, 32, (0.5, 0.375, 0.25), ("union", *DOMAINS), 65536, 24),
    "toy": Scale(ModelSize(layers=2, experts=8, top_k=2, hidden=64, intermediate=64, heads=2, kv_heads=1, head_dim=32),
                 60_000, 4, 64, 4, (0.5,), ("union", "code"), 2048, 4),
}


def _keep_random(layers: list[int], n_experts: int, n: int, seed: int) -> dict[int, tuple[int, ...]]:
    rng = random.Random(seed)
    return {layer: tuple(sorted(rng.sample(range(n_experts), n))) for layer in layers}


def run(scale_name: str = "full", device: str = "cuda", work: Path = Path("quality-work"),
        results: Path = RESULTS, log=print, steps: int | None = None) -> dict[str, Any]:
    from planners import PlanOptions, plan_prune
    from planners.plan import Plan, build_plan
    from planners.policies import KeepDecision, KeepPolicy
    from profiling.profile import load_model, profile
    from quality.evaluate import evaluate
    from rewriter.core.checkpoint import Checkpoint
    from rewriter.exec.executor import execute

    scale = SCALES[scale_name]
    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    corpora_dir = work / "corpora"
    log("corpora")
    corpora = build_corpora(corpora_dir, scale.corpus_bytes)
    model_dir = work / "reference-moe"
    log("train")
    shutil.rmtree(model_dir, ignore_errors=True)
    training = train(corpora_dir, model_dir, size=scale.size, steps=steps or scale.steps, seq_len=scale.seq_len,
                     batch_size=scale.batch_size, device=device, log=log)

    log("profile")
    sal_paths = {}
    t = time.perf_counter()
    for d in DOMAINS:
        sal = profile(str(model_dir), [str(corpora_dir / f"{d}-calib.jsonl")], domain=d, seq_len=scale.seq_len,
                      max_tokens=scale.calib_tokens, batch_size=8, device=device)
        sal_paths[d] = work / f"saliency-{d}.json"
        sal.save(sal_paths[d])
    profile_seconds = time.perf_counter() - t

    ckpt = Checkpoint.open(str(model_dir))
    layout = ckpt.layout
    layers = sorted(layout.moe_layers(ckpt))
    n_exp, top_k = layout.num_experts(ckpt.config), layout.top_k(ckpt.config)
    packs = [str(corpora_dir / f"{d}-eval.jsonl") for d in DOMAINS]
    base_model = load_model(str(model_dir), device)
    cache: dict = {}
    runs = []

    def evaluate_plan(plan: Plan, label: dict[str, Any]) -> None:
        dst = work / "pruned"
        shutil.rmtree(dst, ignore_errors=True)
        execute(plan, str(dst))
        res = evaluate(str(dst), packs, seq_lens=(scale.seq_len,), blocks=scale.eval_blocks, compare=str(model_dir),
                       device=device, base_model=base_model, base_cache=cache)
        rows = {r["pack"].replace("-eval", ""): r for r in res["rows"]}
        runs.append({**label, "pass": res["pass"],
                     "packs": {k: {"ppl": r["ppl"], "base_ppl": r["base"]["ppl"], "d_ppl": r["check"]["d_ppl"],
                                   "mean_p": r["mean_p"], "d_mean_p": r["check"]["d_mean_p"],
                                   "d_cc_rate": r["check"]["d_cc_rate"], "jsd": r["check"]["jsd"],
                                   "pass": r["check"]["pass"]} for k, r in rows.items()}})
        log(f"  {label['rank']:<9} keep {label['keep']:>2}/{n_exp} calib {label['calibration']:<6} "
            + "  ".join(f"{k} {v['ppl']:.3f}" for k, v in runs[-1]["packs"].items()))

    log("prune and evaluate")
    t = time.perf_counter()
    for frac in scale.keep_fracs:
        n = max(top_k, round(frac * n_exp))
        for calib in scale.calibrations:
            names = DOMAINS if calib == "union" else (calib,)
            saliency = tuple(str(sal_paths[d]) for d in names)
            for rank in RANKS:
                evaluate_plan(plan_prune(ckpt, PlanOptions(saliency=saliency, policy=KeepPolicy(rank=rank, keep_n=n))),
                              {"rank": rank, "keep": n, "keep_frac": n / n_exp, "calibration": calib})
        label = {"rank": "random", "keep": n, "keep_frac": n / n_exp, "calibration": "-"}
        evaluate_plan(build_plan(ckpt, KeepDecision(_keep_random(layers, n_exp, n, seed=n), {}, top_k),
                                 provenance={"benchmark": label}), label)
    prune_eval_seconds = time.perf_counter() - t
    shutil.rmtree(work / "pruned", ignore_errors=True)

    import torch
    import transformers

    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "scale": scale_name,
        "hardware": {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "corpora": corpora,
        "training": training,
        "seconds": {"profile": profile_seconds, "prune_and_eval": prune_eval_seconds,
                    "total": time.perf_counter() - t_start},
        "runs": runs,
    }
    results.mkdir(parents=True, exist_ok=True)
    stem = f"quality-{scale_name}"
    (results / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (results / f"{stem}.md").write_text(markdown(doc))
    chart(doc, results / f"{stem}.png")
    return doc


def markdown(doc: dict[str, Any]) -> str:
    tr = doc["training"]
    lines = [
        f"# Pruning quality on the reference MoE ({doc['date']}, scale `{doc['scale']}`)",
        "",
        f"Hardware: {doc['hardware']['device']}, torch {doc['hardware']['torch']}, transformers "
        f"{doc['hardware']['transformers']}. Model: gpt-oss architecture, {tr['size']['layers']} layers x "
        f"{tr['size']['experts']} experts, top-{tr['size']['top_k']}, hidden {tr['size']['hidden']}, byte-level, "
        f"{tr['params'] / 1e6:.1f} M parameters; {tr['steps']} steps of {tr['batch_size']} x {tr['seq_len']} "
        f"tokens in {tr['train_seconds']:.0f} s, final training loss {tr['final_loss']:.3f}. Profiling "
        f"{doc['seconds']['profile']:.0f} s, pruning + evaluation {doc['seconds']['prune_and_eval']:.0f} s, "
        f"total {doc['seconds']['total']:.0f} s.",
        "",
        "Perplexity per evaluation domain (base in the header); `gates` counts the (pack) rows passing all "
        "near-lossless gates (docs/eval.md), union included.",
        "",
    ]
    first = doc["runs"][0]["packs"]
    packs = list(first)
    lines.append("| rank | keep | calibration | " + " | ".join(f"{p} (base {first[p]['base_ppl']:.3f})" for p in packs)
                 + " | gates |")
    lines.append("|---|---:|---|" + "---:|" * len(packs) + "---:|")
    for r in doc["runs"]:
        passed = sum(1 for v in r["packs"].values() if v["pass"])
        lines.append(f"| {r['rank']} | {r['keep']} ({r['keep_frac']:.1%}) | {r['calibration']} | "
                     + " | ".join(f"{r['packs'][p]['ppl']:.3f}" for p in packs) + f" | {passed}/{len(packs)} |")
    lines += ["", "Corpora (sha256, bytes):", ""]
    lines += [f"- `{k}`: {v['bytes']:,} bytes, {v['documents']} documents, `{v['sha256'][:16]}`"
              for k, v in doc["corpora"].items()]
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    packs = [p for p in doc["runs"][0]["packs"] if p != "union"]
    fig, axes = plt.subplots(1, len(packs), figsize=(5 * len(packs), 4), squeeze=False)
    for ax, pack in zip(axes[0], packs):
        for rank in (*RANKS, "random"):
            rows = [r for r in doc["runs"] if r["rank"] == rank and r["calibration"] in ("union", "-")]
            if rows:
                ax.plot([r["keep_frac"] for r in rows], [r["packs"][pack]["ppl"] for r in rows], marker="o", label=rank)
        ax.axhline(doc["runs"][0]["packs"][pack]["base_ppl"], color="gray", linestyle="--", label="base")
        ax.set_xlabel("share of experts kept")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.set_title(f"{pack} (union calibration)")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _flush_print(*a: Any) -> None:
    print(*a, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quality.benchmark")
    ap.add_argument("--size", choices=sorted(SCALES), default="full")
    ap.add_argument("--device", default=None)
    ap.add_argument("--work", type=Path, default=Path("quality-work"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the scale's)")
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run(args.size, device, args.work, args.results, log=_flush_print, steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
