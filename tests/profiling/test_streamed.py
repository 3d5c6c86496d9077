"""The layer-streamed engine against the whole-model path, on tiny real models of every family."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from core.checkpoint import Checkpoint  # noqa: E402
from profiling.deferred import CPU_CHUNK  # noqa: E402
from profiling.profile import batched, profile, profile_streamed  # noqa: E402
from profiling.streamed import StreamedModel  # noqa: E402
from quality.evaluate import evaluate  # noqa: E402
from rewriter.tools.synth import PRESETS, write_checkpoint  # noqa: E402
from tests.conftest import cli  # noqa: E402
from tests.e2e.test_families import FAMILIES, KEEP, _build  # noqa: E402
from tests.e2e.test_model_truth import _bf16_model  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

GPT_OSS = ("gpt_oss_mxfp4", "gpt_oss_bf16")
ALL = (*GPT_OSS, *sorted(k for k in FAMILIES if k != "qwen3_moe_unnormalized"))


def _source(name: str, path: Path) -> tuple[Path, int]:
    """A tiny checkpoint of ``name`` and its vocabulary size."""
    if name == "gpt_oss_mxfp4":
        write_checkpoint(path, PRESETS["tiny"])
        return path, 256
    if name == "gpt_oss_bf16":  # sliding (window 8) and full attention layers: their masks differ
        return _bf16_model(path), 256
    _build(name, path)
    return path, 128


def _data(path: Path, vocab: int, docs: int = 12, length: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("".join(json.dumps({"input_ids": rng.integers(0, vocab, length).tolist()}) + "\n"
                            for _ in range(docs)))
    return path


@pytest.fixture(scope="module", params=ALL)
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src, vocab = _source(request.param, root / "src")
    return request.param, src, vocab, root


@pytest.fixture(scope="module")
def whole_saliency(family):
    name, src, vocab, root = family
    data = [str(_data(root / "cal.jsonl", vocab))]
    return profile(str(src), data, streamed=False, seq_len=16, batch_size=3, device="cpu")


# The MoE of a layer over all 5 batches at once (the default), over chunks of 2 batches (96 of at
# most 100 tokens), and inside each batch's layer call.
@pytest.mark.parametrize("expert_chunk", [None, 100, 0])
def test_streamed_saliency_equals_whole_model(family, whole_saliency, expert_chunk):
    name, src, vocab, root = family
    data = [str(_data(root / "cal.jsonl", vocab))]
    kw = dict(seq_len=16, batch_size=3, device="cpu")  # 240 tokens: 5 batches of 3 x 16
    whole = whole_saliency
    streamed = profile(str(src), data, streamed=True, expert_chunk=expert_chunk, **kw)
    engine = streamed.method["engine"]
    assert engine["expert_chunk"] == (CPU_CHUNK if expert_chunk is None else expert_chunk)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert engine["batched_layers"] == (0 if expert_chunk == 0 else layers)
    assert streamed.method["streamed"] and not whole.method["streamed"]
    assert streamed.method["dtype"] == whole.method["dtype"] == ("bfloat16" if name.startswith("gpt_oss") else "float32")
    assert streamed.tokens == whole.tokens == 240
    assert set(streamed.layers) == set(whole.layers) and whole.layers
    for layer in whole.layers:
        assert streamed.layers[layer]["freq"] == whole.layers[layer]["freq"]
        np.testing.assert_allclose(streamed.layers[layer]["reap"], whole.layers[layer]["reap"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(streamed.layers[layer]["eaft_reap"], whole.layers[layer]["eaft_reap"],
                                   rtol=1e-5, atol=1e-6)
    assert streamed.method["eaft"]["p_lo"] == pytest.approx(whole.method["eaft"]["p_lo"], rel=1e-5)
    if name == "deepseek_v3":  # first_k_dense_replace=1: layer 0 is dense and has no saliency
        assert 0 not in whole.layers and set(whole.layers) == {1, 2}


def test_streamed_eval_equals_whole_model(family, tmp_path):
    name, src, vocab, root = family
    keep = KEEP["deepseek_v3" if name == "deepseek_v3" else "default"]
    n_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    moe_layers = [i for i in range(n_layers) if not (name == "deepseek_v3" and i == 0)]
    (tmp_path / "keep.json").write_text(json.dumps({str(i): keep for i in moe_layers}))
    cli("prune", src, tmp_path / "pruned", "--keep-list", tmp_path / "keep.json", "--quiet")
    packs = [str(_data(tmp_path / "a.jsonl", vocab, seed=1)), str(_data(tmp_path / "b.jsonl", vocab, seed=2))]
    kw = dict(seq_lens=(8, 16), blocks=3, compare=str(src), device="cpu", batch_size=2)
    whole = evaluate(str(tmp_path / "pruned"), packs, streamed=False, **kw)
    streamed = evaluate(str(tmp_path / "pruned"), packs, streamed=True, **kw)
    assert "engine" in streamed and "engine" not in whole
    assert len(streamed["rows"]) == len(whole["rows"]) == 6
    for s, w in zip(streamed["rows"], whole["rows"]):
        assert (s["pack"], s["seq_len"], s["tokens"]) == (w["pack"], w["seq_len"], w["tokens"])
        for m in (s, s["base"]):
            ref = w if m is s else w["base"]
            assert m["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
            assert m["mean_p"] == pytest.approx(ref["mean_p"], rel=1e-5, abs=1e-7)
        assert s["check"]["pass"] == w["check"]["pass"]
    assert streamed["pass"] == whole["pass"]


def test_cli_streamed_profile_and_eval_match(tmp_path):
    src, vocab = _source("gpt_oss_bf16", tmp_path / "src")
    data = _data(tmp_path / "cal.jsonl", vocab)
    common = ["--data", data, "--seq-len", "16", "--device", "cpu", "--quiet"]
    out = cli("profile", src, "--out", tmp_path / "s.json", "--streamed", *common)
    assert "streamed, bfloat16" in out
    cli("profile", src, "--out", tmp_path / "w.json", "--no-streamed", *common)
    s, w = (json.loads((tmp_path / f).read_text()) for f in ("s.json", "w.json"))
    assert s["layers"]["0"]["freq"] == w["layers"]["0"]["freq"] and s["method"]["streamed"]
    ev = ["--data", data, "--seq-len", "16", "--blocks", "4", "--device", "cpu", "--json"]
    a = json.loads(cli("eval", src, "--streamed", *ev))
    b = json.loads(cli("eval", src, "--no-streamed", *ev))
    assert a["rows"][0]["ppl"] == pytest.approx(b["rows"][0]["ppl"], rel=1e-5)
    assert a["engine"]["layers"][0]["layer"] == 0 and len(a["engine"]["layers"]) == 2


def test_float32_checkpoint_profiles_in_float32_unless_told(tmp_path):
    src, vocab = _source("qwen3_moe", tmp_path / "src")
    data = [str(_data(tmp_path / "cal.jsonl", vocab))]
    f32 = profile(str(src), data, seq_len=16, streamed=True)
    bf16 = profile(str(src), data, seq_len=16, streamed=True, dtype=torch.bfloat16)
    assert f32.method["dtype"] == "float32" and bf16.method["dtype"] == "bfloat16"
    ref = profile(str(src), data, seq_len=16, streamed=False, dtype=torch.float32)
    assert f32.layers[0]["freq"] == ref.layers[0]["freq"]
    assert any(not np.allclose(f32.layers[i]["reap"], bf16.layers[i]["reap"], rtol=1e-6) for i in f32.layers)


def test_s3_profile_reads_headers_and_the_run_layers_once(s3, tmp_path):
    """Config says 1 layer, the checkpoint holds 2 (like DeepSeek's extra MTP layer): layer 1's
    bytes are never fetched, every other tensor exactly once."""
    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["tiny"])
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(num_hidden_layers=1, layer_types=cfg["layer_types"][:1])
    (src / "config.json").write_text(json.dumps(cfg))
    s3.make_bucket("streamed")
    s3.upload_dir(src, "streamed/tiny")
    url = "s3://streamed/tiny"
    ckpt = Checkpoint.open(url, s3.options)
    opened = ckpt.storage.counter.bytes
    assert opened == sum(8 + s.header_len for s in ckpt.shards.values()) + sum(
        (src / f).stat().st_size for f in ("config.json", "model.safetensors.index.json"))
    engine = StreamedModel(ckpt, device="cpu")
    rng = np.random.default_rng(0)
    layers, stats = profile_streamed(engine, [rng.integers(0, 256, (2, 16)) for _ in range(3)])
    run = {t.name for t in ckpt.tensors.values() if t.layer != 1}
    assert ckpt.storage.counter.bytes - opened == sum(ckpt.tensors[n].nbytes for n in run)
    assert set(layers) == {0} and stats.tokens == 96
    local = StreamedModel(Checkpoint.open(str(src)), device="cpu")
    rng = np.random.default_rng(0)
    same, _ = profile_streamed(local, [rng.integers(0, 256, (2, 16)) for _ in range(3)])
    assert same[0]["freq"] == layers[0]["freq"] and same[0]["reap"] == layers[0]["reap"]
    out = cli("profile", url, "--storage-options", json.dumps(s3.options), "--data", _data(tmp_path / "d.jsonl", 256),
              "--out", tmp_path / "s.json", "--seq-len", "16", "--device", "cpu", "--quiet")
    assert "streamed" in out  # a remote model is always streamed
    out = cli("profile", url, "--storage-options", json.dumps(s3.options), "--data", tmp_path / "d.jsonl",
              "--out", tmp_path / "n.json", "--device", "cpu", "--quiet", "--no-streamed", expect=2)
    assert out.startswith(f"error: {url}: a remote model can only be run streamed")


def _live_weight_bytes(model) -> int:
    """Bytes of every parameter and buffer of the model that is not on the meta device."""
    return sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta")


def test_weights_held_do_not_grow_with_layers(tmp_path):
    """Same geometry, 2 vs 8 layers: the same peak of layer weights held at once, measured on
    the model itself after every layer's MoE forward and by the engine's ledger."""
    measured = {}
    for n in (2, 8):
        src = tmp_path / str(n)
        write_checkpoint(src, PRESETS["tiny"].with_layers(n))
        engine = StreamedModel(Checkpoint.open(str(src)), device="cpu")
        live: list[int] = []
        batches = list(batched(np.random.default_rng(0).integers(0, 256, (4, 16)), 2))
        computed = _live_weight_bytes(engine.model)  # rotary tables: computed, not read
        assert 0 < computed < 1024
        engine.run(batches, lambda h, ids: None,
                   on_layer=lambda layer, batch, e=engine, seen=live: seen.append(_live_weight_bytes(e.model)))
        timings = engine.stats.layers
        assert len(timings) == n and len(live) == n  # one MoE forward per layer, over both batches
        assert max(live) - computed == timings[0].weight_bytes  # one decoder layer built at a time
        # The ledger: the built layer, its raw bytes and the next layer's raw bytes read ahead.
        assert engine.stats.peak_weight_bytes <= timings[0].weight_bytes + 2 * timings[0].raw_bytes
        # The ledger's peak depends on how far the reader thread got (bounded above); the weights
        # alive on the model are deterministic.
        measured[n] = max(live)
    assert measured[2] == measured[8]


def test_profile_errors_are_clean_and_leave_nothing(tmp_path, monkeypatch):
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["tiny"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input_ids": [1, 2, 999]}) + "\n")
    fds = len(os.listdir("/proc/self/fd"))
    for mode in ("--streamed", "--no-streamed"):
        out = cli("profile", src, "--data", bad, "--out", tmp_path / "s.json", "--device", "cpu", "--quiet", mode,
                  expect=2)
        assert f"error: {bad}:1: token id 999 is outside the model's vocabulary of 256" in out
        assert "Traceback" not in out
        out = cli("eval", src, "--data", bad, "--seq-len", "2", "--device", "cpu", mode, expect=2)
        assert out.startswith(f"error: {bad}:1: token id 999 is outside")
    assert list(tmp.iterdir()) == [] and len(os.listdir("/proc/self/fd")) == fds
    assert not (tmp_path / "s.json").exists()


def test_profile_refuses_a_dense_model_before_loading_it(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(tmp_path / "dense"))
    shard = tmp_path / "dense" / "model.safetensors"
    before = shard.stat().st_atime_ns, shard.read_bytes()
    data = _data(tmp_path / "d.jsonl", 128)
    out = cli("profile", tmp_path / "dense", "--data", data, "--out", tmp_path / "s.json", "--device", "cpu",
              "--quiet", expect=2)
    assert out.startswith("error: ") and "not a supported MoE family" in out and "may not be an MoE model" in out
    assert len(out.strip().splitlines()) == 1 and shard.read_bytes() == before[1]
    out = cli("eval", tmp_path / "dense", "--data", data, "--device", "tpu", expect=2)
    assert out.startswith("error: --device tpu: expected cpu or cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_profile_device_cuda_without_cuda_is_a_clear_error(tmp_path, tiny):
    out = cli("profile", tiny, "--data", _data(tmp_path / "d.jsonl", 256), "--out", tmp_path / "s.json",
              "--device", "cuda", "--quiet", expect=2)
    assert out.startswith("error: --device cuda: this torch") and "use --device cpu" in out
    assert not (tmp_path / "s.json").exists()


def test_fp8_block_scaled_experts_are_dequantized_like_their_float_copy(tmp_path):
    """A DeepSeek-V3 checkpoint whose expert weights are FP8 with 16 x 16 block scales profiles,
    streamed, exactly like a float32 checkpoint holding the dequantized values, run whole."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    _build("deepseek_v3", src)
    tensors = load_file(str(src / "model.safetensors"))
    fp8, dense = {}, {}
    for name, w in tensors.items():
        if ".experts." in name and name.endswith("proj.weight"):
            blocks = w.reshape(w.shape[0] // 16, 16, w.shape[1] // 16, 16)
            scale = blocks.abs().amax(dim=(1, 3)) / 448.0
            q = (blocks / scale[:, None, :, None]).reshape(w.shape).to(torch.float8_e4m3fn)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            blocks = q.float().reshape(blocks.shape) * scale[:, None, :, None]
            dense[name] = blocks.reshape(w.shape)
        else:
            fp8[name] = dense[name] = w
    cfg = json.loads((src / "config.json").read_text())
    for d, state, extra in (("fp8", fp8, {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                  "weight_block_size": [16, 16]}}),
                            ("dense", dense, {})):
        (tmp_path / d).mkdir()
        save_file(state, str(tmp_path / d / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / d / "config.json").write_text(json.dumps({**cfg, **extra}))
    assert any(v.dtype == torch.float8_e4m3fn for v in fp8.values())
    data = [str(_data(tmp_path / "cal.jsonl", 128))]
    streamed = profile(str(tmp_path / "fp8"), data, seq_len=16, batch_size=2, streamed=True)
    whole = profile(str(tmp_path / "dense"), data, seq_len=16, batch_size=2, streamed=False)
    assert streamed.method["dtype"] == "float32"
    for layer in whole.layers:
        assert streamed.layers[layer]["freq"] == whole.layers[layer]["freq"]
        np.testing.assert_allclose(streamed.layers[layer]["reap"], whole.layers[layer]["reap"], rtol=1e-5)


def test_synth_computing_weights_compute(tmp_path):
    """`synth --computing`: finite unit-scale activations and spread routing at the `small`
    geometry; sequences longer than its sliding window (128), so both mask kinds matter."""
    from profiling.weights import dequantize_mxfp4, read_tensors

    out = cli("synth", "--preset", "small", "--layers", "2", "--computing", tmp_path / "m")
    assert "2 layers x 32 experts" in out
    ckpt = Checkpoint.open(str(tmp_path / "m"))
    names = [f"model.layers.0.mlp.experts.gate_up_proj_{k}" for k in ("blocks", "scales")]
    stored = read_tensors(ckpt.storage, sorted((ckpt.tensors[n] for n in names), key=lambda t: t.begin))
    w = dequantize_mxfp4(stored[names[0]], stored[names[1]], torch.float32)
    rms = float(w.pow(2).mean().sqrt())
    assert 0.5 / 512**0.5 < rms < 2 / 512**0.5  # 1/sqrt(fan-in)
    assert not torch.equal(w[0], w[1])  # experts differ
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 4096, (2, 192)) for _ in range(2)]
    finals: list[torch.Tensor] = []
    engine = StreamedModel(ckpt, device="cpu")
    layers, stats = profile_streamed(engine, batches)
    engine.run(batches, lambda hidden, ids: finals.append(hidden))
    assert all(torch.isfinite(h).all() for h in finals)
    assert 0.1 < float(torch.cat(finals).float().std()) < 10
    for layer in layers.values():
        assert sum(f > 0 for f in layer["freq"]) >= 24  # routing spreads over most of the 32 experts
    assert np.isfinite(stats.p_lo) and np.isfinite(stats.h_lo) and stats.h_lo > 0.1
    whole = profile(str(tmp_path / "m"), [str(_data(tmp_path / "d.jsonl", 4096, docs=4, length=200))],
                    seq_len=192, batch_size=2, streamed=False)
    again = profile(str(tmp_path / "m"), [str(tmp_path / "d.jsonl")], seq_len=192, batch_size=2, streamed=True)
    for i in whole.layers:
        assert again.layers[i]["freq"] == whole.layers[i]["freq"]
    assert "--computing" in cli("synth", "--preset", "small", "--sparse", "--computing", tmp_path / "x", expect=2)


def test_mxfp4_dequantization_equals_transformers_own():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from profiling.weights import dequantize_mxfp4

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 135, (3, 10, 4), dtype=torch.uint8, generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        ours = dequantize_mxfp4(blocks, scales, dtype)
        assert ours.shape == (3, 128, 10) and ours.dtype == dtype
        assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=dtype))


def test_profile_and_eval_help_describe_every_family_and_the_engine():
    text = " ".join(cli("profile", "--help").split())
    assert "gpt-oss MODEL" not in text and "any supported MoE family" in text
    for opt in ("--streamed / --no-streamed", "--gpu-memory GB", "--dtype [auto|bfloat16|float16|float32]",
                "--storage-options"):
        assert opt in text and opt in " ".join(cli("eval", "--help").split())


def test_auto_streams_only_when_the_model_does_not_fit(tiny, tmp_path):
    from profiling.weights import dense_bytes

    data = [str(_data(tmp_path / "d.jsonl", 256, docs=2))]
    need = dense_bytes(Checkpoint.open(str(tiny)), torch.bfloat16)
    assert profile(str(tiny), data, seq_len=16).method["streamed"] is False
    assert profile(str(tiny), data, seq_len=16, gpu_memory=need).method["streamed"] is True  # needs 80 % free
    assert profile(str(tiny), data, seq_len=16, gpu_memory=2 * need).method["streamed"] is False


@pytest.mark.parametrize("command", ["profile", "eval"])
def test_data_that_is_not_text_or_too_short_is_one_clear_error(tmp_path, fresh_tiny, command):
    binary = tmp_path / "bin.dat"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    jsonl = tmp_path / "odd.jsonl"
    jsonl.write_text('[1, 2]\n')
    short = tmp_path / "short.txt"
    short.write_text("")
    out_args = ["--out", tmp_path / "s.json", "--quiet"] if command == "profile" else []
    for data, says in ((binary, "not UTF-8 text"), (jsonl, "expected an object"), (short, "at least 2 are needed"),
                       (tmp_path, "is a folder")):
        out = cli(command, fresh_tiny, "--data", data, "--device", "cpu", *out_args, expect=2)
        assert out.startswith("error: ") and says in out and "internal error" not in out, out
    assert not (tmp_path / "s.json").exists()


def test_profile_and_eval_refuse_what_cannot_run_before_any_work(tmp_path, fresh_tiny):
    data = tmp_path / "ids.jsonl"
    data.write_text(json.dumps({"input_ids": list(range(200))}) + "\n")
    for args, says in ((["profile", fresh_tiny, "--data", data, "--out", tmp_path / "no" / "s.json"], "not an existing folder"),
                       (["profile", fresh_tiny, "--data", data, "--out", tmp_path / "s.json", "--seq-len", "1"], "--seq-len"),
                       (["eval", fresh_tiny, "--data", data, "--seq-len", "1"], "--seq-len"),
                       (["eval", fresh_tiny, "--data", data, "--gpu-memory", "1e308"], "--gpu-memory"),
                       (["profile", fresh_tiny, "--data", data, "--out", tmp_path / "s.json", "--max-tokens", "1"],
                        "--max-tokens 1 leaves 1")):
        out = cli(*args, "--device", "cpu", expect=2)
        assert out.startswith("error: ") and says in out and "internal error" not in out, out
    assert not (tmp_path / "no").exists() and not (tmp_path / "s.json").exists()


def test_eval_refuses_a_base_with_another_vocabulary(tmp_path, fresh_tiny):
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(tmp_path / "dense"))
    data = tmp_path / "ids.jsonl"
    data.write_text(json.dumps({"input_ids": list(range(100))}) + "\n")
    out = cli("eval", fresh_tiny, "--data", data, "--seq-len", "16", "--blocks", "2", "--device", "cpu",
              "--compare", tmp_path / "dense", expect=2)
    assert out.startswith("error: --compare ") and "cannot be compared" in out and "internal error" not in out


def test_attention_choice_and_its_override(tmp_path, monkeypatch, tiny):
    """gpt-oss (no SDPA: its sinks) runs flex attention on CUDA and transformers' default on the
    CPU; a family with SDPA keeps it; REWRITER_ATTENTION overrides the choice, and a choice the
    model cannot run is one clear error through profile and eval, naming the variable."""
    from profiling.streamed import ATTENTION_ENV, attention_for

    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention_for(transformers.GptOssForCausalLM, cuda) == "flex_attention"
    assert attention_for(transformers.GptOssForCausalLM, cpu) is None
    assert attention_for(transformers.Qwen3MoeForCausalLM, cuda) is None
    monkeypatch.setenv(ATTENTION_ENV, "default")
    assert attention_for(transformers.GptOssForCausalLM, cuda) is None
    monkeypatch.setenv(ATTENTION_ENV, "eager")
    assert attention_for(transformers.Qwen3MoeForCausalLM, cpu) == "eager"
    data = _data(tmp_path / "d.jsonl", 256)
    for mode in ("--streamed", "--no-streamed"):  # the saliency file says which attention ran
        cli("profile", tiny, "--data", data, "--out", tmp_path / "e.json", "--device", "cpu", "--quiet", mode, "--force")
        assert json.loads((tmp_path / "e.json").read_text())["method"]["attention"] == "eager"
    monkeypatch.setenv(ATTENTION_ENV, "sdpa")  # gpt-oss has no SDPA attention
    for mode in ("--streamed", "--no-streamed"):
        out = cli("profile", tiny, "--data", data, "--out", tmp_path / "s.json", "--device", "cpu", "--quiet", mode,
                  expect=2)
        assert out.startswith(f"error: {tiny}: cannot run attention 'sdpa' ({ATTENTION_ENV})"), out
        assert len(out.strip().splitlines()) == 1
        out = cli("eval", tiny, "--data", data, "--seq-len", "8", "--device", "cpu", mode, expect=2)
        assert out.startswith(f"error: {tiny}: cannot run attention 'sdpa'"), out
    # Flex attention runs gpt-oss's sinks on CUDA only: on the CPU that is refused before any work.
    monkeypatch.setenv(ATTENTION_ENV, "flex_attention")
    for mode in ("--streamed", "--no-streamed"):
        out = cli("profile", tiny, "--data", data, "--out", tmp_path / "s.json", "--device", "cpu", "--quiet", mode,
                  expect=2)
        assert out.startswith(f"error: {tiny}: cannot run attention 'flex_attention' ({ATTENTION_ENV}) on cpu"), out
        out = cli("eval", tiny, "--data", data, "--seq-len", "8", "--device", "cpu", mode, expect=2)
        assert "only on CUDA" in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "s.json").exists()
