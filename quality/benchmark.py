"""The quality benchmark: train the reference MoE with several seeds, profile per domain on
several calibration draws, prune with each ranking at several keep fractions and calibrations,
and evaluate every pruned model against its original: perplexity and task accuracy.

``python -m quality.benchmark [--size full|ref|toy] [--device cuda] [--jobs N] [--deadline S] [--work DIR] [--results DIR]``

``--train-only`` trains each seed's reference model into ``WORK`` and stops; a later run with
``--reuse-trained`` evaluates those models (two commands where one would not fit a time limit).

Per training seed (one process each; ``--jobs`` run at once, sharing one GPU) and calibration
seed: each domain's calibration documents are shuffled with the calibration seed and cut into
two disjoint halves A and B. Saliency profiled on A plans the pruning; the keep sets planned
from A and from B measure keep-set stability (:mod:`planners.stability`). The same calibration
seed draws the same halves for every training seed, and every model answers the same task
problems, so differences between rankings are paired. :mod:`quality.report` aggregates the
seeds: means, 95 % t-intervals and paired differences.

Everything runs through the project's own code: :func:`profiling.profile.profile` (saliency),
:func:`planners.plan_prune` (planning), :func:`rewriter.exec.run.executor.execute` (the rewrite),
:func:`quality.evaluate.evaluate` (perplexity and the gates) and :mod:`quality.tasks` (exact match
of greedy generation and answer-byte accuracy). ``random`` keeps a seeded random set of the same
size per layer; ``+outliers`` rows plan with ``--keep-outliers``; ``+recal`` rows are the plan of
the row without it after :func:`profiling.recalibrate.recalibrate` (router recalibration on the
union of the calibration half A), paired with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
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
    seeds: tuple[int, ...] = (0, 1, 2)
    calib_seeds: tuple[int, ...] = (0, 1, 2)
    outlier_z: float = 2.5
    outlier_ranks: tuple[str, ...] = ("reap", "eaft_reap")
    arith_problems: int = 768
    code_problems: int = 512
    task_context: int = 192
    eval_batch: int = 256
    #: Router recalibration of every plan of these calibrations (and of the random baseline),
    #: on the union of half A's documents: Adam steps and tokens sampled per layer.
    recal_calibrations: tuple[str, ...] = ("union",)
    recal_steps: int = 200
    recal_tokens: int = 65536
    #: Training time budget per seed (seconds; ``steps`` is then only a cap): see :func:`train`.
    train_seconds: float | None = None
    lr: float = 2e-3


SCALES = {
    # 288 steps of 96 x 512 tokens (14.2 M tokens): a step of this model is bound by kernel
    # launches, not FLOPs, so fewer, larger steps train the same tokens sooner.
    "full": Scale(ModelSize(), 4_000_000, 288, 512, 96, (0.5, 0.375, 0.25), ("union", *DOMAINS), 32768, 24),
    # A model that can solve its tasks: 8 layers x 16 experts, hidden 384 (61 M parameters),
    # trained for a GPU-time budget per seed (the three seeds side by side on one GPU: 540 s
    # of it after compiling leaves each about 3 minutes of the GPU alone).
    "ref": Scale(ModelSize(layers=8, experts=16, top_k=4, hidden=384, intermediate=384, heads=6, kv_heads=2, head_dim=64),
                 8_000_000, 1_000_000, 512, 64, (0.5, 0.375, 0.25), ("union", *DOMAINS), 32768, 24,
                 calib_seeds=(0, 1), recal_steps=100, recal_tokens=32768, train_seconds=540,
                 # the prompts fill the training window (512 bytes) but for the longest answer
                 task_context=448),
    "toy": Scale(ModelSize(layers=2, experts=8, top_k=2, hidden=64, intermediate=64, heads=2, kv_heads=1, head_dim=32),
                 60_000, 4, 64, 4, (0.5,), ("union",), 1024, 2, seeds=(0, 1), calib_seeds=(0, 1),
                 outlier_ranks=("eaft_reap",), arith_problems=24, code_problems=8, task_context=48, eval_batch=16,
                 recal_steps=10, recal_tokens=512),
}


def _keep_random(layers: list[int], n_experts: int, n: int, seed: int) -> dict[int, tuple[int, ...]]:
    rng = random.Random(seed)
    return {layer: tuple(sorted(rng.sample(range(n_experts), n))) for layer in layers}


def calibration_halves(corpora: Path, out: Path, calib_seed: int) -> dict[str, tuple[Path, Path]]:
    """Each domain's calibration documents, shuffled with ``calib_seed`` and cut into two
    disjoint halves (``{domain}-A.jsonl``, ``{domain}-B.jsonl``)."""
    out.mkdir(parents=True, exist_ok=True)
    halves = {}
    for d in DOMAINS:
        lines = (corpora / f"{d}-calib.jsonl").read_text().splitlines(keepends=True)
        random.Random(calib_seed).shuffle(lines)
        a, b = out / f"{d}-A.jsonl", out / f"{d}-B.jsonl"
        a.write_text("".join(lines[: len(lines) // 2]))
        b.write_text("".join(lines[len(lines) // 2 :]))
        halves[d] = (a, b)
    return halves


def _stability_rows(sal: dict[str, tuple[Any, Any]], keeps: list[int]) -> list[dict[str, Any]]:
    from planners.policies import KeepPolicy
    from planners.stability import stability

    rows = []
    for d, (a, b) in sal.items():
        for rank in RANKS:
            for n in keeps:
                rep = stability(a, b, KeepPolicy(rank=rank, keep_n=n))
                rows.append({"domain": d, "rank": rank, "keep": n, **rep["summary"]})
    return rows


class _Evaluator:
    """Rewrites plans into one scratch folder and scores each output against the base model.

    The pruned models of one keep count share a config: one model object per config is built
    once and each rewrite's tensors are loaded into it, instead of building a model per plan."""

    def __init__(self, scale: Scale, model_dir: Path, corpora: Path, work: Path, device: str, log):
        from profiling.profile import load_model
        from quality.tasks import build_tasks, score_tasks

        self.scale, self.model_dir, self.work, self.device, self.log = scale, model_dir, work, device, log
        self.packs = [str(corpora / f"{d}-eval.jsonl") for d in DOMAINS]
        self.tasks = build_tasks(corpora, scale.arith_problems, scale.code_problems, scale.task_context)
        self.base_model = load_model(str(model_dir), device)
        self.base_tasks = score_tasks(self.base_model, self.tasks, scale.eval_batch)
        self.cache: dict = {}
        self.models: dict[str, Any] = {}
        self.checked: set[str] = set()
        self.reuse = True
        self.runs: list[dict[str, Any]] = []

    def _load(self, path: Path):
        """The model at ``path``, in the cached model object of its config when there is one. The
        first reuse of each object is checked against a model built from the folder; a mismatch
        turns the reuse off."""
        import safetensors.torch
        import torch

        from profiling.profile import load_model

        key = (path / "config.json").read_text()
        model = self.models.get(key)
        if model is None:
            model = load_model(str(path), self.device)
            if self.reuse:
                self.models[key] = model
            return model
        state: dict[str, Any] = {}
        for f in sorted(path.glob("*.safetensors")):
            state.update(safetensors.torch.load_file(str(f), device=str(self.device)))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            self.log(f"  cannot reuse the pruned model object ({str(e).splitlines()[0]}); building each model")
            self.reuse, self.models = False, {}
            return load_model(str(path), self.device)
        if key not in self.checked:
            fresh = load_model(str(path), self.device).state_dict()
            ours = model.state_dict()
            if set(fresh) != set(ours) or not all(torch.equal(fresh[k], ours[k]) for k in fresh):
                self.log("  the reused pruned model differs from one built from its folder; building each model")
                self.reuse, self.models = False, {}
                return load_model(str(path), self.device)
            self.checked.add(key)
        return model

    def __call__(self, plan, label: dict[str, Any]) -> None:
        from quality.evaluate import evaluate
        from quality.tasks import score_tasks
        from rewriter.exec.run import execute

        dst = self.work / "pruned"
        shutil.rmtree(dst, ignore_errors=True)
        execute(plan, str(dst))
        model = self._load(dst)
        res = evaluate(str(dst), self.packs, seq_lens=(self.scale.seq_len,), blocks=self.scale.eval_blocks,
                       compare=str(self.model_dir), device=self.device, model=model, base_model=self.base_model,
                       base_cache=self.cache, batch_size=self.scale.eval_batch // 4)
        tasks = score_tasks(model, self.tasks, self.scale.eval_batch)
        rows = {r["pack"].replace("-eval", ""): r for r in res["rows"]}
        self.runs.append({**label, "pass": res["pass"], "keep_sets": {str(k): list(v) for k, v in plan.keep.items()},
                          **_task_fields(tasks),
                          "packs": {k: {"ppl": r["ppl"], "base_ppl": r["base"]["ppl"], "d_mean_p": r["check"]["d_mean_p"],
                                        "jsd": r["check"]["jsd"], "pass": r["check"]["pass"]} for k, r in rows.items()}})
        run = self.runs[-1]
        self.log(f"  seed {label['seed']} calib {label['calib_seed']} {label['rank']:<18} keep {label['keep']:>2} "
                 f"calib {label['calibration']:<6} "
                 + "  ".join(f"{k} {v['ppl']:.3f}" for k, v in run["packs"].items())
                 + "  " + "  ".join(f"{k} acc {v:.3f} byte {run['task_bytes'][k]:.3f}" for k, v in run["tasks"].items()))


def _task_fields(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A run's task results: exact-match accuracy, answer-byte accuracy, and both per kind."""
    return {"tasks": {k: v["accuracy"] for k, v in tasks.items()},
            "task_bytes": {k: v["byte_accuracy"] for k, v in tasks.items()},
            "task_kinds": {k: {kind: {"accuracy": s["accuracy"], "byte_accuracy": s["byte_accuracy"]}
                               for kind, s in v["kinds"].items()} for k, v in tasks.items()}}


def _profile_halves(scale: Scale, model_dir: Path, halves: dict[str, tuple[Path, Path]], out: Path,
                    device: str) -> dict[str, tuple[Any, Any]]:
    from planners.saliency import load_saliency
    from profiling.profile import profile

    sal = {}
    for d, pair in halves.items():
        loaded = []
        for half, data in zip("AB", pair):
            s = profile(str(model_dir), [str(data)], domain=d, seq_len=scale.seq_len, max_tokens=scale.calib_tokens,
                        batch_size=8, device=device)
            path = out / f"saliency-{d}-{half}.json"
            s.save(path)
            loaded.append(load_saliency(str(path)))
        sal[d] = (loaded[0], loaded[1])
    return sal


def _recalibrated(scale: Scale, ckpt, plan, data: list[str], evaluate_plan: _Evaluator, label: dict[str, Any]) -> None:
    """Evaluate ``plan`` after router recalibration on ``data``, as rank ``<rank>+recal``."""
    from profiling.recal_fit import FitSettings
    from profiling.recalibrate import recalibrate

    settings = FitSettings(tokens=scale.recal_tokens, steps=scale.recal_steps, seed=label["calib_seed"])
    res = recalibrate(ckpt.url, plan, data, settings=settings, seq_len=scale.seq_len, batch_size=8,
                      device=evaluate_plan.device)
    fits = {str(f.layer): f.summary() for f in res.layers}
    evaluate_plan(res.plan, {**label, "rank": f"{label['rank']}+recal", "recal": fits})


def _prune_grid(scale: Scale, ckpt, sal: dict[str, tuple[Any, Any]], evaluate_plan: _Evaluator,
                label: dict[str, Any], halves: dict[str, tuple[Path, Path]]) -> None:
    from planners import PlanOptions, plan_prune
    from planners.build import build_plan
    from planners.policies import KeepDecision, KeepPolicy

    layout = ckpt.layout
    layers = sorted(layout.moe_layers(ckpt))
    n_exp, top_k = layout.num_experts(ckpt.config), layout.top_k(ckpt.config)
    recal_data = [str(halves[d][0]) for d in DOMAINS]
    for frac in scale.keep_fracs:
        n = max(top_k, round(frac * n_exp))
        cell = {**label, "keep": n, "keep_frac": n / n_exp, "outliers": None}
        for calib in scale.calibrations:
            names = DOMAINS if calib == "union" else (calib,)
            files = tuple(sal[d][0].source for d in names)
            for rank in RANKS:
                policy = KeepPolicy(rank=rank, keep_n=n)
                plan = plan_prune(ckpt, PlanOptions(saliency=files, policy=policy))
                evaluate_plan(plan, {**cell, "rank": rank, "calibration": calib})
                if calib in scale.recal_calibrations:
                    _recalibrated(scale, ckpt, plan, recal_data, evaluate_plan, {**cell, "rank": rank, "calibration": calib})
                if calib == "union" and rank in scale.outlier_ranks:
                    policy = replace(policy, keep_outliers=scale.outlier_z)
                    evaluate_plan(plan_prune(ckpt, PlanOptions(saliency=files, policy=policy)),
                                  {**cell, "rank": f"{rank}+outliers", "calibration": calib,
                                   "outliers": scale.outlier_z})
        rnd = {**cell, "rank": "random", "calibration": "-"}
        keep = _keep_random(layers, n_exp, n, seed=1000 * label["calib_seed"] + n)
        plan = build_plan(ckpt, KeepDecision(keep, {}, top_k), provenance={"benchmark": rnd})
        evaluate_plan(plan, rnd)
        if scale.recal_calibrations:
            _recalibrated(scale, ckpt, plan, recal_data, evaluate_plan, rnd)


def _trained(model_dir: Path, scale: Scale, seed: int) -> dict[str, Any]:
    """The training record of the reference model an earlier run left in ``model_dir`` for this
    scale and seed; none there, or one of another size or seed, ends the run with a message."""
    try:
        info = json.loads((model_dir / "training.json").read_text())
    except FileNotFoundError:
        raise SystemExit(f"{model_dir}: no reference model trained there; train it first with --train-only "
                         f"and the same --work") from None
    except (OSError, ValueError) as e:
        raise SystemExit(f"{model_dir / 'training.json'}: unreadable ({e}); train again with --train-only") from None
    if info.get("size") != asdict(scale.size) or info.get("seed") != seed:
        raise SystemExit(f"{model_dir}: trained for another size or seed than --size's seed {seed}; "
                         f"remove it or run without --reuse-trained")
    return info


def run_seed(scale: Scale, seed: int, corpora: Path, work: Path, device: str, log=print,
             steps: int | None = None, on_draw=None, trace: Path | None = None, *,
             train_only: bool = False, reuse: bool = False) -> dict[str, Any]:
    """Train the reference MoE with ``seed`` and run the whole grid on it, every calibration seed;
    ``on_draw(result so far)`` after each calibration seed. ``train_only``: stop after training
    (the model stays in ``work``); ``reuse``: take the model an earlier run trained there."""
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "reference-moe"
    if reuse:
        training = {**_trained(model_dir, scale, seed), "reused": True}
        log(f"seed {seed}: reusing the model trained in {model_dir} ({training['steps']} steps)")
    else:
        shutil.rmtree(model_dir, ignore_errors=True)
        log(f"seed {seed}: train")
        training = train(corpora, model_dir, size=scale.size, steps=steps or scale.steps, seq_len=scale.seq_len,
                         batch_size=scale.batch_size, lr=scale.lr, seed=seed, device=device, log=log,
                         budget=None if steps else scale.train_seconds, trace=trace)
    if train_only:
        doc = {"seed": seed, "training": training}
        if on_draw:
            on_draw(doc)
        return doc
    with _default_attention():
        return _evaluate_seed(scale, seed, corpora, work, device, log, training, on_draw)


@contextlib.contextmanager
def _default_attention() -> Iterator[None]:
    """Profiling, recalibration and evaluation run transformers' default attention unless told
    otherwise: their batches come in many shapes (task prompts by answer length), and flex
    attention compiles once per shape, which costs more than it saves on this small model. The
    next seed's training (in this process with ``--jobs 1``) has the environment as it was."""
    from profiling.streamed import ATTENTION_ENV

    given = ATTENTION_ENV in os.environ
    os.environ.setdefault(ATTENTION_ENV, "default")
    try:
        yield
    finally:
        if not given:
            os.environ.pop(ATTENTION_ENV, None)


def _evaluate_seed(scale: Scale, seed: int, corpora: Path, work: Path, device: str, log, training: dict[str, Any],
                   on_draw) -> dict[str, Any]:
    """The whole grid on the reference model ``work`` holds, every calibration seed."""
    from core.checkpoint import Checkpoint

    model_dir = work / "reference-moe"
    ckpt = Checkpoint.open(str(model_dir))
    t = time.perf_counter()
    evaluate_plan = _Evaluator(scale, model_dir, corpora, work, device, log)
    log(f"seed {seed}: base task accuracy " + ", ".join(
        f"{k} {v['accuracy']:.3f} (bytes {v['byte_accuracy']:.3f}; "
        + " ".join(f"{kind} {s['accuracy']:.3f}" for kind, s in v["kinds"].items()) + ")"
        for k, v in evaluate_plan.base_tasks.items()))
    seconds = {"train": training["train_seconds"], "profile": 0.0}
    stability_rows: list[dict[str, Any]] = []
    doc: dict[str, Any] = {}
    for c in scale.calib_seeds:
        t_prof = time.perf_counter()
        out = work / f"calib-{c}"
        halves = calibration_halves(corpora, out, c)
        sal = _profile_halves(scale, model_dir, halves, out, device)
        seconds["profile"] += time.perf_counter() - t_prof
        keeps = sorted({max(ckpt.layout.top_k(ckpt.config), round(f * ckpt.layout.num_experts(ckpt.config)))
                        for f in scale.keep_fracs}, reverse=True)
        stability_rows += [{"seed": seed, "calib_seed": c, **r} for r in _stability_rows(sal, keeps)]
        _prune_grid(scale, ckpt, sal, evaluate_plan, {"seed": seed, "calib_seed": c}, halves)
        seconds["prune_and_eval"] = time.perf_counter() - t - seconds["profile"]
        base_packs = {k: v["base_ppl"] for k, v in evaluate_plan.runs[0]["packs"].items()}
        doc = {"seed": seed, "training": training, "seconds": dict(seconds), "runs": evaluate_plan.runs,
               "base": {**_task_fields(evaluate_plan.base_tasks), "ppl": base_packs},
               "task_problems": {k: v["problems"] for k, v in evaluate_plan.base_tasks.items()},
               "task_kind_problems": {k: {kind: s["problems"] for kind, s in v["kinds"].items()}
                                      for k, v in evaluate_plan.base_tasks.items()},
               "stability": stability_rows, "calib_seeds_done": [r for r in scale.calib_seeds if r <= c]}
        if on_draw:
            on_draw(doc)  # what is done so far survives a run stopped at its deadline
    shutil.rmtree(work / "pruned", ignore_errors=True)
    return doc


def _spawn(args: argparse.Namespace, seed: int, corpora: Path, log) -> tuple[subprocess.Popen, Path, Path]:
    work = args.work / f"seed-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    out, log_path = work / "result.json", work / "log.txt"
    cmd = [sys.executable, "-m", "quality.benchmark", "--size", args.size, "--device", args.device,
           "--work", str(work), "--corpora", str(corpora), "--one-seed", str(seed), "--seed-out", str(out)]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    if args.train_seconds is not None:
        cmd += ["--train-seconds", str(args.train_seconds)]
    if args.trace_training:
        cmd += ["--trace-training", "--results", str(args.results)]
    cmd += ["--train-only"] if args.train_only else []
    cmd += ["--reuse-trained"] if args.reuse_trained else []
    log(f"seed {seed}: {' '.join(cmd)} (log {log_path})")
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT), out, log_path


def _run_parallel(args: argparse.Namespace, scale: Scale, corpora: Path, t0: float, log) -> list[dict[str, Any]]:
    """One process per training seed, ``args.jobs`` at once. Past ``args.deadline`` seconds the
    processes still running are stopped and their finished calibration draws are kept."""
    pending = list(scale.seeds)
    running: dict[int, tuple[subprocess.Popen, Path, Path]] = {}
    docs = []

    def collect(s: int, out: Path) -> None:
        if out.exists():
            docs.append(json.loads(out.read_text()))

    while pending or running:
        while pending and len(running) < args.jobs:
            s = pending.pop(0)
            running[s] = _spawn(args, s, corpora, log)
        time.sleep(1.0)
        for s, (proc, out, log_path) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[s]
            if proc.returncode != 0:
                for p, _, _ in running.values():
                    p.kill()
                raise SystemExit(f"seed {s} failed (exit {proc.returncode}); its log:\n"
                                 + "\n".join(log_path.read_text().splitlines()[-40:]))
            log(f"seed {s}: done")
            collect(s, out)
        if args.deadline and time.perf_counter() - t0 > args.deadline:
            for s, (proc, out, _) in running.items():
                proc.kill()
                proc.wait()
                log(f"seed {s}: stopped at the {args.deadline:.0f} s deadline")
                collect(s, out)
            if pending:
                log(f"seeds {pending}: not started before the deadline")
            break
    if not docs:
        raise SystemExit("no training seed finished a calibration draw")
    return docs


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Every training seed (``args.jobs`` processes at once), then the report."""
    from quality import report

    scale = scale_of(args)
    t0 = time.perf_counter()
    corpora_dir = args.work / "corpora"
    if args.reuse_trained:  # every seed's model, before any seed's work
        for s in scale.seeds:
            _trained(args.work / f"seed-{s}" / "reference-moe", scale, s)
    log("corpora")
    corpora = build_corpora(corpora_dir, scale.corpus_bytes)
    seed_docs = []
    if args.trace_training:
        args.results.mkdir(parents=True, exist_ok=True)
    if args.jobs <= 1:
        for s in scale.seeds:
            trace = args.results / f"train-trace-{args.size}-seed{s}.txt" if args.trace_training else None
            seed_docs.append(run_seed(scale, s, corpora_dir, args.work / f"seed-{s}", args.device, log, args.steps,
                                      trace=trace, train_only=args.train_only, reuse=args.reuse_trained))
            if args.deadline and time.perf_counter() - t0 > args.deadline:
                break
    else:
        seed_docs = _run_parallel(args, scale, corpora_dir, t0, log)
    if args.train_only:
        for d in sorted(seed_docs, key=lambda d: d["seed"]):
            t = d["training"]
            log(f"seed {d['seed']}: trained {t['steps']} steps in {t['train_seconds']:.0f} s, loss {t['final_loss']:.3f}; "
                f"run again with --reuse-trained to evaluate it")
        return {"seeds": seed_docs}
    import torch
    import transformers

    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "scale": args.size,
        "hardware": {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
                     "torch": torch.__version__, "transformers": transformers.__version__, "jobs": args.jobs},
        "corpora": corpora,
        "scale_settings": {"seeds": list(scale.seeds), "calib_seeds": list(scale.calib_seeds),
                           "keep_fracs": list(scale.keep_fracs), "calibrations": list(scale.calibrations),
                           "calib_tokens_per_half": scale.calib_tokens, "eval_blocks": scale.eval_blocks,
                           "seq_len": scale.seq_len, "outlier_z": scale.outlier_z,
                           "recal": {"calibrations": list(scale.recal_calibrations), "steps": scale.recal_steps,
                                     "tokens_per_layer": scale.recal_tokens, "data": "union of calibration half A"}},
        "wall_seconds": time.perf_counter() - t0,
        "seeds": sorted(seed_docs, key=lambda d: d["seed"]),
    }
    report.write(doc, args.results, f"quality-{args.size}")
    return doc


def _flush_print(*a: Any) -> None:
    print(*a, flush=True)


def scale_of(args: argparse.Namespace) -> Scale:
    """The scale ``--size`` names, with ``--train-seconds`` when given."""
    scale = SCALES[args.size]
    return replace(scale, train_seconds=args.train_seconds) if args.train_seconds is not None else scale


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m quality.benchmark")
    ap.add_argument("--size", choices=sorted(SCALES), default="full")
    ap.add_argument("--device", default=None)
    ap.add_argument("--work", type=Path, default=Path("quality-work"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the scale's)")
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="training time budget per seed, after the first (compiling) step (default: the scale's)")
    ap.add_argument("--jobs", type=int, default=1, help="training seeds run at once, one process each")
    ap.add_argument("--deadline", type=float, default=None,
                    help="with --jobs: stop after this many seconds, reporting the calibration draws finished")
    ap.add_argument("--trace-training", action="store_true",
                    help="profile 3 training steps per seed: RESULTS/train-trace-SIZE-seedN.txt")
    ap.add_argument("--train-only", action="store_true",
                    help="train each seed's reference model into WORK and stop (no pruning, no report)")
    ap.add_argument("--reuse-trained", action="store_true",
                    help="evaluate the reference models an earlier run trained into WORK instead of training")
    ap.add_argument("--one-seed", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--corpora", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.train_only and args.reuse_trained:
        ap.error("--train-only trains the models --reuse-trained would take: give one of them")
    if args.reuse_trained and (args.steps or args.train_seconds is not None or args.trace_training):
        ap.error("--steps, --train-seconds and --trace-training shape training, which --reuse-trained skips")
    if args.train_seconds is not None and not (math.isfinite(args.train_seconds) and args.train_seconds > 0):
        ap.error(f"--train-seconds {args.train_seconds}: a number of seconds > 0")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one_seed is not None:  # one training seed, in a process of its own (--jobs)
        def save(doc: dict[str, Any]) -> None:
            tmp = args.seed_out.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc) + "\n")
            tmp.replace(args.seed_out)

        trace = args.results / f"train-trace-{args.size}-seed{args.one_seed}.txt" if args.trace_training else None
        if trace:
            args.results.mkdir(parents=True, exist_ok=True)
        run_seed(scale_of(args), args.one_seed, args.corpora, args.work, args.device, _flush_print, args.steps,
                 on_draw=save, trace=trace, train_only=args.train_only, reuse=args.reuse_trained)
        return 0
    run(args, log=_flush_print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
