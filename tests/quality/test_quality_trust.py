"""Quality you can trust: intervals, paired differences, task accuracy, keep-set stability,
outlier experts, the eval's BOS convention, and routing renormalization."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from core.errors import PolicyError, SaliencyError
from planners.policies import Domain, KeepPolicy
from planners.saliency import Saliency, load_saliency
from planners.selection import outliers, select_keep
from planners.stability import jaccard, stability
from tests.conftest import cli


def _sal(reap, max_act=None, domain="d", source="mem.json", model=None):
    layers = {}
    for layer, scores in enumerate(reap):
        layers[layer] = {"freq": tuple(1.0 for _ in scores), "reap": tuple(scores), "eaft_reap": tuple(scores)}
        if max_act is not None:
            layers[layer]["max_act"] = tuple(max_act[layer])
    return Saliency(domain, layers, tokens=10, model=model or {"top_k": 2}, source=source)


# --- intervals and paired differences -------------------------------------------------------------

def test_t_interval_is_the_student_t_interval():
    from quality.report import t_interval

    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(t_interval([5.0])[1])
    assert all(math.isnan(v) for v in t_interval([1.0, float("nan")]))


def _doc(diffs):
    """Three training seeds, two calibration draws; ``b`` is ``a`` plus ``diffs[seed]`` in union ppl."""
    seeds = []
    for s, d in enumerate(diffs):
        runs = []
        for c in (0, 1):
            for rank, ppl in (("reap", 5.0 + s), ("eaft_reap", 5.0 + s + d)):
                runs.append({"rank": rank, "keep": 4, "calibration": "union", "calib_seed": c,
                             "keep_sets": {"0": [0, 1, 2, 3]}, "tasks": {"arith": 0.5, "code": 0.25},
                             "packs": {p: {"ppl": ppl} for p in ("code", "prose", "arith", "union")}})
        seeds.append({"seed": s, "runs": runs, "base": {"tasks": {"arith": 0.5, "code": 0.5}}})
    return {"seeds": seeds}


def test_paired_difference_decides_significance():
    from quality.report import cells, comparisons

    steady = [c for c in comparisons(_doc([-1.0, -1.1, -0.9])) if c["metric"] == "ppl_union"]
    assert len(steady) == 1 and steady[0]["a"][0] == "eaft_reap" and steady[0]["significant"]
    assert steady[0]["diff"] == pytest.approx(-1.0)
    noisy = [c for c in comparisons(_doc([-1.0, 1.2, 0.1])) if c["metric"] == "ppl_union"]
    assert not noisy[0]["significant"]
    cell = next(c for c in cells(_doc([0.0, 0.0, 0.0])) if c["rank"] == "reap")
    assert cell["metrics"]["ppl_union"][0] == pytest.approx(6.0)  # mean of 5, 6, 7
    assert cell["metrics"]["rec_code"][0] == pytest.approx(0.5)  # 0.25 of a base 0.5


# --- outlier experts ------------------------------------------------------------------------------

def test_outliers_by_z_score_are_always_kept():
    reap = [[8, 7, 6, 5, 4, 3, 2, 1]]
    peak = [[1, 1, 1, 1, 1, 1, 1, 30]]  # expert 7: low REAP, one huge activation
    dom = [Domain(_sal(reap, peak))]
    assert outliers(dom, 0, 2.0) == [7]
    assert outliers(dom, 0, 3.0) == []  # z of the outlier is sqrt(7) = 2.65
    plain = select_keep(dom, [0], 8, 2, KeepPolicy(rank="reap", keep_n=4))
    kept = select_keep(dom, [0], 8, 2, KeepPolicy(rank="reap", keep_n=4, keep_outliers=2.0))
    assert plain.keep[0] == (0, 1, 2, 3)
    assert kept.keep[0] == (0, 1, 2, 7) and kept.reasons[0][7] == ("outlier",)
    # The peak of an expert is its largest over the domains.
    other = Domain(_sal(reap, [[1, 1, 1, 1, 1, 1, 1, 1]], domain="e"))
    assert outliers([other, *dom], 0, 2.0) == [7]


def test_keep_outliers_needs_max_act_and_a_uniform_count():
    dom = [Domain(_sal([[3, 2, 1, 0]], source="old.json"))]
    with pytest.raises(PolicyError, match="old.json: layer 0 records no maximum activation norms"):
        select_keep(dom, [0], 4, 2, KeepPolicy(keep_n=2, keep_outliers=2.0))
    with pytest.raises(PolicyError, match="--budget"):
        select_keep(dom, [0], 4, 2, KeepPolicy(budget=2, keep_outliers=2.0))


def test_saliency_files_with_and_without_max_act_load(tmp_path):
    _sal([[1.0, 2.0]]).save(tmp_path / "old.json")
    assert load_saliency(str(tmp_path / "old.json")).max_act(0) is None
    _sal([[1.0, 2.0]], [[0.5, 9.0]]).save(tmp_path / "new.json")
    assert load_saliency(str(tmp_path / "new.json")).max_act(0) == (0.5, 9.0)
    doc = json.loads((tmp_path / "new.json").read_text())
    doc["layers"]["0"]["max_act"] = [0.5, -1.0]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(SaliencyError, match="expert 1 max_act is -1.0"):
        load_saliency(str(tmp_path / "bad.json"))


def test_keep_outliers_cli_errors(tmp_path, tiny, tiny_saliency):
    old = json.loads(tiny_saliency.read_text())
    for scores in old["layers"].values():
        del scores["max_act"]  # as files profiled before max_act existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    out = cli("plan", tiny, "--saliency", tmp_path / "old.json", "--keep-n", "4", "--keep-outliers", "2", expect=2)
    assert out.count("error:") == 1 and "max_act" in out and "--keep-outliers" in out
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}))
    out = cli("plan", tiny, "--keep-list", keep, "--keep-outliers", "2", expect=2)
    assert "--keep-outliers chooses from saliency files" in out


def test_synth_saliency_can_try_keep_outliers(tmp_path, tiny):
    """`synth-saliency` writes maximum activation norms, so the policy can be tried without a GPU."""
    sal = tmp_path / "s.json"
    cli("synth-saliency", tiny, "--out", sal, "--seed", "3")
    doc = json.loads(sal.read_text())
    assert all(len(v["max_act"]) == 8 and min(v["max_act"]) > 0 for v in doc["layers"].values())
    plan = json.loads(cli("plan", tiny, "--saliency", sal, "--keep-n", "4", "--keep-outliers", "1", "--json"))
    dom = [Domain(load_saliency(str(sal)))]
    assert any(outliers(dom, int(layer), 1.0) for layer in plan["keep"])
    for layer, kept in plan["keep"].items():
        assert set(outliers(dom, int(layer), 1.0)) <= set(kept)


# --- keep-set stability ---------------------------------------------------------------------------

def test_stability_matches_the_plans_of_each_half(tmp_path, tiny):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    cli("synth-saliency", tiny, "--out", a, "--seed", "1")
    cli("synth-saliency", tiny, "--out", b, "--seed", "2")
    report = json.loads(cli("stability", a, b, "--keep-n", "4", "--rank", "reap", "--json"))
    plans = [json.loads(cli("plan", tiny, "--saliency", s, "--keep-n", "4", "--rank", "reap", "--json"))["keep"]
             for s in (a, b)]
    for row in report["layers"]:
        ka, kb = plans[0][str(row["layer"])], plans[1][str(row["layer"])]
        assert row["jaccard"] == jaccard(ka, kb)
        assert row["common"] == sorted(set(ka) & set(kb)) and row["only_a"] == sorted(set(ka) - set(kb))
    values = [r["jaccard"] for r in report["layers"]]
    assert report["summary"]["mean_jaccard"] == pytest.approx(sum(values) / len(values))
    assert report["summary"]["min_jaccard"] == min(values)
    same = json.loads(cli("stability", a, a, "--keep-frac", "0.5", "--json"))
    assert same["summary"]["mean_jaccard"] == 1.0 and same["summary"]["identical_layers"] == 2
    text = cli("stability", a, b, "--keep-n", "4")
    assert "mean Jaccard" in text and "layers keep the same experts" in text


def test_stability_refuses_files_of_different_models(tmp_path, tiny):
    a = tmp_path / "a.json"
    cli("synth-saliency", tiny, "--out", a)
    doc = json.loads(a.read_text())
    fewer = {**doc, "layers": {"0": doc["layers"]["0"]}}
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    out = cli("stability", a, tmp_path / "fewer.json", "--keep-n", "4", expect=2)
    assert out.count("error:") == 1 and "covers layers [0, 1]" in out and "fewer.json" in out
    other = {**doc, "model": {**doc["model"], "fingerprint": "0" * 64}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert "different models" in cli("stability", a, tmp_path / "other.json", "--keep-n", "4", expect=2)
    wider = {**doc, "layers": {k: {m: v + [0.0] for m, v in d.items()} for k, d in doc["layers"].items()}}
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    with pytest.raises(SaliencyError, match="different numbers of experts"):
        stability(load_saliency(str(a)), load_saliency(str(tmp_path / "wider.json")), KeepPolicy(keep_n=4))
    out = cli("stability", a, tmp_path / "missing.json", "--keep-n", "4", expect=2)
    assert out.count("error:") == 1 and "missing.json: file not found" in out


# --- task accuracy --------------------------------------------------------------------------------

def _gpt_oss(vocab=256):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=32, eos_token_id=0, pad_token_id=0)
    return transformers.GptOssForCausalLM(cfg).eval()


def test_task_problems_are_held_out_answers_and_line_halves(tmp_path):
    from quality.tasks import arith_task, code_task

    lines = [f"{a}{op}{b}={eval(f'{a}{op}{b}')}" for a, b, op in zip(range(10, 90, 3), range(5, 80, 2), "+-*" * 30)]
    (tmp_path / "arith.jsonl").write_text("".join(json.dumps({"text": "\n".join(lines[i:i + 6]) + "\n"}) + "\n"
                                                  for i in range(0, len(lines), 6)))
    code = "def f(x):\n    return x + 1\n\n\nclass Thing:\n    value = 3\n    other_value = 4\n" * 4
    (tmp_path / "code.jsonl").write_text(json.dumps({"text": code}) + "\n")
    arith = arith_task(tmp_path / "arith.jsonl", n=8, context=24)
    assert len(arith.targets) == 8 and arith.prompts.shape == (8, 24)
    for prompt, target, kind in zip(arith.prompts, arith.targets, arith.kinds):
        expr = bytes(prompt.tolist()).split(b"\n")[-1]
        assert expr.endswith(b"=") and str(eval(expr[:-1])).encode() == target and kind.encode() in expr
    task = code_task(tmp_path / "code.jsonl", n=5, context=30)
    for prompt, target in zip(task.prompts, task.targets):
        head = bytes(prompt.tolist()).split(b"\n")[-1]  # the line's first half ends the prompt
        line = (head + target).decode()
        assert line in code.splitlines() and head.strip() and target.strip()
        assert abs(len(target) - len(line.lstrip()) / 2) <= 1


@pytest.mark.torch
def test_teacher_forced_exact_match_is_greedy_generation():
    torch = pytest.importorskip("torch")
    from quality.tasks import NEWLINE, Task, accuracy

    model = _gpt_oss(vocab=NEWLINE + 1)  # newline is one of 11 tokens: greedy generation often ends a line
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # sharper logits: fewer prompts run into one repeated token
    prompts = np.random.default_rng(0).integers(0, NEWLINE, size=(40, 12))
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                             max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    targets, solved, right, total = [], 0, 0, 0
    for row in out[:, 12:].tolist():
        # Target: the generated bytes up to a newline (solved), or the first 3, which greedy
        # generation does not follow with a newline (not solved: 3 of 4 answer bytes right).
        if NEWLINE in row[1:]:
            t = bytes(row[: row.index(NEWLINE, 1)])
            solved, right = solved + 1, right + len(t) + 1
        else:
            t = bytes(row[:3])
            right += 3
        targets.append(t)
        total += len(t) + 1
    kinds = tuple("ab"[i % 2] for i in range(len(targets)))
    result = accuracy(model, Task("made", prompts, tuple(targets), kinds), batch_size=16)
    assert 0 < solved < len(targets)  # the check can tell the two apart
    assert result["problems"] == 40 and result["solved"] == solved and result["accuracy"] == solved / 40
    assert result["byte_accuracy"] == pytest.approx(right / total)
    assert set(result["kinds"]) == {"a", "b"} and sum(k["solved"] for k in result["kinds"].values()) == solved


def test_arithmetic_corpus_holds_out_its_evaluation_problems(tmp_path):
    import re

    from quality.refmoe import arith_pools, build_corpora

    pools = arith_pools()
    for kind in ("+", "-", "*"):
        sets = {s: set(pools[s][kind]) for s in ("train", "calib", "eval")}
        assert sets["eval"] and not sets["eval"] & sets["train"] and not sets["calib"] & sets["train"]
        assert not sets["eval"] & sets["calib"]
    assert all(a < 10 <= b < 100 for a, b in pools["eval"]["*"])
    assert all(a < 100 and b < 100 for a, b in pools["eval"]["+"] + pools["eval"]["-"])
    build_corpora(tmp_path, 30_000)
    seen = {}
    for split in ("train", "calib", "eval"):
        text = "".join(json.loads(line)["text"] for line in (tmp_path / f"arith-{split}.jsonl").read_text().splitlines())
        probs = re.findall(r"(?m)^(\d+)([-+*])(\d+)=(-?\d+)$", text)
        assert len(probs) == text.count("\n") and {op for _, op, _, _ in probs} == {"+", "-", "*"}
        assert all(int(c) == eval(f"{a}{op}{b}") for a, op, b, c in probs)
        seen[split] = {(op, int(a), int(b)) for a, op, b, _ in probs}
    assert seen["eval"] and not seen["eval"] & seen["train"] and not seen["calib"] & seen["train"]


# --- eval follows the tokenizer's BOS convention --------------------------------------------------

def _word_tokenizer(path, bos: bool):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "the of and to in is that for it as with was on be by".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return fast, words, len(vocab)


@pytest.mark.torch
def test_eval_blocks_start_with_bos_and_match_the_transformers_loss(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import random

    from profiling.data import block_prefix
    from quality.evaluate import evaluate, load_blocks

    model_dir = tmp_path / "m"
    tok, words, vocab = _word_tokenizer(model_dir, bos=True)
    assert block_prefix(tok) == [1]
    assert block_prefix(_word_tokenizer(tmp_path / "plain", bos=False)[0]) == []
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.MixtralForCausalLM(cfg).float().eval()
    model.save_pretrained(str(model_dir))
    rng = random.Random(0)
    pack = tmp_path / "words.jsonl"
    pack.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30))}) + "\n"
                            for _ in range(10)))
    result = evaluate(str(model_dir), [str(pack)], seq_lens=(16,), blocks=5, device="cpu")
    blocks = load_blocks(str(model_dir), [str(pack)], 16, 5, vocab, 2)["words"]
    assert len(blocks) == 5 and all(b[0] == 1 and len(b) == 16 for b in blocks)
    assert 2 in np.concatenate(blocks)  # documents are packed with EOS between them
    # The standard transformers loss of each block: mean NLL of tokens 1..15 given what precedes.
    with torch.no_grad():
        losses = [float(model(input_ids=torch.as_tensor(b)[None], labels=torch.as_tensor(b)[None]).loss) for b in blocks]
    row = next(r for r in result["rows"] if r["pack"] == "words")
    assert row["tokens"] == 5 * 15
    assert row["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


# --- routing renormalization ----------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_renormalize_topk_makes_kept_weights_sum_to_one(tmp_path, family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from planners import PlanOptions, plan_prune
    from rewriter.exec.run.executor import execute

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    if family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**common, moe_intermediate_size=16, shared_expert_intermediate_size=16)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        cfg = transformers.OlmoeConfig(**common, eos_token_id=1, pad_token_id=0)
        cls = transformers.OlmoeForCausalLM
    torch.manual_seed(0)
    cls(cfg).float().save_pretrained(str(tmp_path / "src"))
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"0": [0, 2, 5, 6], "1": [1, 3, 4, 7]}))
    ids = torch.randint(0, 64, (1, 12))

    def routing_sums(path):
        model = cls.from_pretrained(str(path)).eval()
        sums = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda mod, args, out: sums.append(out[1].sum(-1)))
                 for layer in model.model.layers]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        return model.config.norm_topk_prob, torch.cat(sums)

    for renorm, dst in ((False, tmp_path / "plain"), (True, tmp_path / "renorm")):
        execute(plan_prune(str(tmp_path / "src"), PlanOptions(keep_list=str(keep), renormalize_topk=renorm)), str(dst))
    flag, sums = routing_sums(tmp_path / "plain")
    assert flag is False and (sums < 1 - 1e-3).all()  # softmax mass outside the top-k is lost
    flag, sums = routing_sums(tmp_path / "renorm")
    assert flag is True and torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert json.loads((tmp_path / "renorm" / "config.json").read_text())["norm_topk_prob"] is True
    card = (tmp_path / "renorm" / "README.md").read_text()  # the model card says what changed in the config
    assert "Changed in `config.json`" in card and '"norm_topk_prob": true' in card


def test_renormalize_topk_is_a_note_where_weights_already_sum_to_one(tmp_path, tiny, tiny_saliency):
    out = cli("plan", tiny, "--saliency", tiny_saliency, "--keep-n", "4", "--renormalize-topk",
              "--out", tmp_path / "p.json")
    assert "changes nothing for gpt_oss" in out
    plan = json.loads((tmp_path / "p.json").read_text())
    assert "norm_topk_prob" not in plan["config"]
