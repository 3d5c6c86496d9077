"""Layer-batched experts, several devices (two processes on the CPU), and the time sections."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from core.errors import DeviceError  # noqa: E402
from profiling import deferred, sections  # noqa: E402
from profiling.devices import parse_devices, shares  # noqa: E402
from profiling.profile import profile  # noqa: E402
from quality.evaluate import evaluate  # noqa: E402
from tests.conftest import cli  # noqa: E402
from tests.profiling.test_streamed import _data, _source  # noqa: E402

pytestmark = [pytest.mark.torch]


class _Ends(torch.nn.Module):
    """Decoder layers that end their forward in different ways after the MoE."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Identity()


class Plain(_Ends):
    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class Unpacks(_Ends):
    def forward(self, x):
        residual = x
        x, _ = self.mlp(x)
        x = x + residual
        return x


class Scaled(_Ends):  # Granite-MoE: residual + h * multiplier
    def forward(self, h):
        residual = h
        h = self.mlp(h)
        h = residual + h * 0.5
        return h


class Extra(_Ends):  # more after the residual add
    def forward(self, h):
        residual = h
        h = self.mlp(h)
        h = residual + h
        h = h.clamp(-1, 1)
        return h


class Twice(_Ends):
    def forward(self, h):
        residual = h
        h = self.mlp(self.mlp(h))
        h = residual + h
        return h


class Masked(_Ends):  # the MoE takes more than the hidden states
    def forward(self, h, mask):
        residual = h
        h = self.mlp(h, mask)
        h = residual + h
        return h


def test_only_layers_that_end_in_residual_plus_mlp_are_deferred():
    assert deferred.deferrable(Plain()) and deferred.deferrable(Unpacks())
    assert deferred._tail(Plain) == 0 and deferred._tail(Unpacks) == 2
    assert not any(deferred.deferrable(c()) for c in (Scaled, Extra, Twice, Masked))


@pytest.mark.parametrize("cls", [Plain, Unpacks])
def test_stashed_layer_returns_its_residual_and_the_moe_finishes_it(cls):
    """residual + 0, then + mlp(x) over the stacked inputs: the layer's own result, bit for bit."""
    class Double(torch.nn.Module):
        def forward(self, x):
            return (x * 3, None) if cls is Unpacks else x * 3

    layer = cls()
    layer.mlp = Double()
    xs = [torch.randn(2, 5, 4, dtype=torch.bfloat16), torch.randn(1, 3, 4, dtype=torch.bfloat16)]
    with deferred.stashing(layer, torch.bfloat16) as stash:
        ys = [layer(x) for x in xs]
    assert all(torch.equal(y, x) for x, y in zip(xs, ys)) and len(stash.kept) == 2
    outs = deferred.run_moe(layer.mlp, stash.kept)
    for x, y, out in zip(xs, ys, outs):
        assert torch.equal(y + out, layer(x))
    assert isinstance(layer.mlp, Double)


def test_chunks_keep_batch_order_within_the_token_limit():
    assert deferred.chunks([48] * 5, 100) == [[0, 1], [2, 3], [4]]
    assert deferred.chunks([48] * 5, 0) == [[0], [1], [2], [3], [4]]
    assert deferred.chunks([200, 10, 10], 100) == [[0], [1, 2]]  # a batch over the limit goes alone
    assert deferred.chunks([48] * 5, 1 << 18) == [[0, 1, 2, 3, 4]]


def test_expert_chunk_at_120b_geometry_within_24_gib(tmp_path):
    """The default chunk from the budget: gpt-oss-120b's MoE takes 224,640 bytes per token
    (hidden 2,880, expert width 2,880, top-4, bf16); 12 GiB left for activations hold 43,018."""
    from core.checkpoint import Checkpoint
    from profiling.streamed import StreamedModel
    from rewriter.tools.synth import preset, write_checkpoint

    write_checkpoint(tmp_path / "m", preset("120b", 2), sparse=True)
    engine = StreamedModel(Checkpoint.open(str(tmp_path / "m")), device="cpu", dtype=torch.bfloat16)
    per_token = engine._token_bytes()
    assert per_token == 2 * (3 * 2880 + 4 * (2 * 2880 + 5 * 2880)) + 4 * 4 * 2880 == 224_640
    assert deferred.chunk_for(12 << 30, 8192, per_token) == (12 << 30) * 3 // 4 // per_token == 43_018
    assert deferred.chunk_for(1 << 30, 8192, per_token) == 8192  # at least one batch
    assert deferred.chunk_for(1 << 40, 8192, per_token) == deferred.MAX_CHUNK


def test_shares_split_consecutive_batches_by_tokens():
    assert shares([4] * 5, 2) == [range(0, 2), range(2, 5)]
    assert shares([8, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 9)]
    assert shares([3, 3, 3], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    parts = shares([1], 2)
    assert sorted(len(p) for p in parts) == [0, 1]


@pytest.mark.parametrize("spec, expected", [
    ("cuda:0", "cuda:0 does not exist: this torch sees 0 CUDA device(s)"),
    ("cpu,,cpu", "expected a comma-separated list of devices"),
    ("gpu0", "'gpu0' is not a device; expected cpu or cuda:N"),
    ("cuda:x", "'cuda:x' is not a device"),
    ("all", "sees no CUDA device; name the devices"),
])
def test_bad_device_lists_are_refused_clearly(spec, expected):
    if torch.cuda.is_available():
        pytest.skip("the messages are those of a machine without CUDA")
    with pytest.raises(DeviceError, match="--devices") as e:
        parse_devices(spec)
    assert expected in str(e.value)
    assert parse_devices("cpu, cpu") == ["cpu", "cpu"]


def test_cli_refuses_bad_devices_before_reading_the_model(tmp_path):
    src, vocab = _source("gpt_oss_bf16", tmp_path / "src")
    data = _data(tmp_path / "cal.jsonl", vocab)
    common = ["--data", data, "--seq-len", "16", "--quiet"]
    out = cli("profile", src, "--out", tmp_path / "s.json", "--devices", "gpu0", *common, expect=2)
    assert "error: --devices gpu0: 'gpu0' is not a device" in out and "Traceback" not in out
    out = cli("profile", src, "--out", tmp_path / "s.json", "--devices", "cpu,cpu", "--device", "cpu", *common,
              expect=2)
    assert "--device or --devices, not both" in out
    out = cli("profile", src, "--out", tmp_path / "s.json", "--devices", "cpu,cpu", "--no-streamed", *common,
              expect=2)
    assert "error: --devices cpu,cpu runs the streamed engine on each device; drop --no-streamed" in out
    out = cli("eval", src, "--data", data, "--seq-len", "16", "--devices", "cpu,cpu", "--no-streamed", expect=2)
    assert "error: --devices cpu,cpu runs the streamed engine" in out
    assert not (tmp_path / "s.json").exists()


def test_cli_refuses_expert_chunk_without_the_streamed_engine(tmp_path):
    src, vocab = _source("gpt_oss_bf16", tmp_path / "src")
    data = _data(tmp_path / "cal.jsonl", vocab)
    for args in (["profile", src, "--out", tmp_path / "s.json", "--quiet"], ["eval", src]):
        out = cli(*args, "--data", data, "--seq-len", "16", "--device", "cpu", "--no-streamed",
                  "--expert-chunk", "64", expect=2)
        (line,) = [x for x in out.splitlines() if x.startswith("error:")]
        assert "--expert-chunk" in line and "drop --no-streamed" in line, line
    assert not (tmp_path / "s.json").exists()


def test_one_device_listed_runs_the_streamed_engine(tmp_path):
    """``--devices cpu`` is a list of one: streamed, as every list is (the help says so)."""
    src, vocab = _source("gpt_oss_bf16", tmp_path / "src")
    data = _data(tmp_path / "cal.jsonl", vocab)
    cli("profile", src, "--out", tmp_path / "s.json", "--devices", "cpu", "--data", data, "--seq-len", "16", "--quiet")
    method = json.loads((tmp_path / "s.json").read_text())["method"]
    assert method["streamed"] is True and method["devices"] == ["cpu"], method
    res = json.loads(cli("eval", src, "--data", data, "--seq-len", "16", "--blocks", "2", "--devices", "cpu", "--json"))
    assert res["engine"]["layers"], res  # the engine reports per layer only when it streamed
    # The same rule through the library calls the commands make.
    sal = profile(str(src), [str(data)], seq_len=16, batch_size=3, devices=["cpu"])
    assert sal.method["streamed"] is True
    assert evaluate(str(src), [str(data)], seq_lens=(16,), blocks=2, devices=["cpu"])["engine"]["layers"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_oss_bf16", "deepseek_v3"])
def test_two_processes_give_one_devices_saliency(name, tmp_path):
    """``--devices cpu,cpu``: two processes, each streaming its share; the merged saliency is one
    process's: frequencies, maximum norms and the EAFT thresholds exactly, REAP and EAFT-REAP
    within float64 summation order."""
    src, vocab = _source(name, tmp_path / "src")
    data = _data(tmp_path / "cal.jsonl", vocab, docs=15)
    common = ["--data", data, "--seq-len", "16", "--batch-size", "2", "--quiet"]
    cli("profile", src, "--out", tmp_path / "one.json", "--streamed", "--device", "cpu", *common)
    out = cli("profile", src, "--out", tmp_path / "two.json", "--devices", "cpu,cpu", *common)
    assert "streamed" in out
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["method"]["devices"] == ["cpu", "cpu"] and len(two["method"]["engine"]["workers"]) == 2
    assert sum(w["activation_bytes"] for w in two["method"]["engine"]["workers"]) == \
        one["method"]["engine"]["activation_bytes"]  # each token went through exactly one process
    assert two["tokens"] == one["tokens"] > 0
    assert (two["method"]["eaft"]["p_lo"], two["method"]["eaft"]["h_lo"]) == \
        (one["method"]["eaft"]["p_lo"], one["method"]["eaft"]["h_lo"])
    assert set(two["layers"]) == set(one["layers"]) and one["layers"]
    for layer, ref in one["layers"].items():
        got = two["layers"][layer]
        assert got["freq"] == ref["freq"] and got["max_act"] == ref["max_act"]
        np.testing.assert_allclose(got["reap"], ref["reap"], rtol=1e-12)
        np.testing.assert_allclose(got["eaft_reap"], ref["eaft_reap"], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_cli_expert_chunk_chooses_how_the_moe_runs(tmp_path):
    """``--expert-chunk``: batch by batch (0) or over chunks of batches; the same saliency and eval."""
    src, vocab = _source("gpt_oss_bf16", tmp_path / "src")
    data = _data(tmp_path / "cal.jsonl", vocab)
    common = ["--data", data, "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--streamed", "--quiet"]
    for chunk in ("0", "64"):
        cli("profile", src, "--out", tmp_path / f"{chunk}.json", "--expert-chunk", chunk, *common)
    per_batch, chunked = (json.loads((tmp_path / f"{c}.json").read_text()) for c in ("0", "64"))
    assert (per_batch["method"]["engine"]["expert_chunk"], per_batch["method"]["engine"]["batched_layers"]) == (0, 0)
    assert (chunked["method"]["engine"]["expert_chunk"], chunked["method"]["engine"]["batched_layers"]) == (64, 2)
    for layer, ref in per_batch["layers"].items():
        assert chunked["layers"][layer]["freq"] == ref["freq"]
        np.testing.assert_allclose(chunked["layers"][layer]["reap"], ref["reap"], rtol=1e-5)
    ev = ["--data", data, "--seq-len", "16", "--blocks", "4", "--batch-size", "1", "--device", "cpu", "--streamed",
          "--json"]
    a = json.loads(cli("eval", src, "--expert-chunk", "0", *ev))
    b = json.loads(cli("eval", src, "--expert-chunk", "48", *ev))
    assert (a["engine"]["batched_layers"], b["engine"]["batched_layers"]) == (0, 2)
    assert b["rows"][0]["ppl"] == pytest.approx(a["rows"][0]["ppl"], rel=1e-5)
    out = cli("profile", src, "--out", tmp_path / "x.json", "--expert-chunk", "-1", *common, expect=2)
    assert "--expert-chunk" in out


@pytest.mark.slow
def test_two_processes_give_one_devices_eval(tmp_path):
    """``eval --devices cpu,cpu --compare``: the blocks split across two processes, the scores put
    back in order; every figure is one process's."""
    src, vocab = _source("qwen3_moe", tmp_path / "src")
    packs = [_data(tmp_path / "a.jsonl", vocab, seed=1), _data(tmp_path / "b.jsonl", vocab, seed=2)]
    common = ["--data", packs[0], "--data", packs[1], "--seq-len", "8", "--seq-len", "16", "--blocks", "3",
              "--batch-size", "2", "--compare", src, "--json"]
    one = json.loads(cli("eval", src, "--streamed", "--device", "cpu", *common))
    two = json.loads(cli("eval", src, "--devices", "cpu,cpu", *common))
    assert two["engine"]["devices"] == ["cpu", "cpu"] and two["pass"] is one["pass"] is True
    assert len(two["rows"]) == len(one["rows"]) == 6
    for a, b in zip(two["rows"], one["rows"]):
        assert (a["pack"], a["seq_len"], a["tokens"]) == (b["pack"], b["seq_len"], b["tokens"])
        # Each process's MoE takes other rows at once than one process's: float32 matmuls may
        # round a last bit differently, nothing more.
        for x, y in ((a, b), (a["base"], b["base"])):
            for key in ("ppl", "mean_p", "mean_entropy"):
                assert x[key] == pytest.approx(y[key], rel=1e-6), key
            assert x["cc_rate"] == pytest.approx(y["cc_rate"], abs=2 / x["tokens"])
            assert np.abs(np.subtract(x["hist"], y["hist"])).sum() <= 2


@pytest.mark.slow
def test_sections_name_where_a_streamed_run_spends_its_time(tmp_path):
    src, vocab = _source("gpt_oss_bf16", tmp_path / "src")
    data = [str(_data(tmp_path / "cal.jsonl", vocab))]
    for chunk in (None, 0):
        found = sections.Sections("cpu")
        sections.activate(found)
        try:
            profile(str(src), data, seq_len=16, batch_size=3, streamed=True, expert_chunk=chunk)
        finally:
            sections.activate(None)
        # 5 batches through 2 layers: attention per batch, the MoE per chunk (1 or 5 per layer)
        assert found.calls["layer_call"] == 10 and found.calls["dequantize"] == 5  # embed, 2 layers, norm, head
        assert found.calls["expert_gemms"] == found.calls["observer"] == (2 if chunk is None else 10)
        assert found.calls["moe"] == (2 if chunk is None else 0) and found.calls["read_wait"] == 2
        assert set(found.seconds) >= {"layer_call", "expert_gemms", "observer", "dequantize", "hidden_copies"}
        assert not found._stack
    assert profile(str(src), data, seq_len=16, streamed=True).method["streamed"]  # off again: no error
    assert sections._active is None
