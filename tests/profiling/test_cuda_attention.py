"""Flex attention on CUDA computes what transformers' eager attention computes for gpt-oss: its
sinks and its sliding windows (run on a machine with CUDA: `pytest tests/profiling/test_cuda_attention.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from profiling.profile import load_model, profile  # noqa: E402
from profiling.streamed import ATTENTION_ENV  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _model(path: Path) -> Path:
    """A float32 gpt-oss with large attention sinks and a window (8) shorter than the sequences."""
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)
    model.save_pretrained(str(path))
    return path


def test_flex_attention_equals_eager_with_sinks_and_windows(tmp_path, monkeypatch):
    src = _model(tmp_path / "m")
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (2, 40)), device="cuda")
    logits = {}
    for choice in ("auto", "eager"):
        monkeypatch.setenv(ATTENTION_ENV, choice)
        model = load_model(str(src), "cuda", torch.float32)
        assert model.config._attn_implementation == ("flex_attention" if choice == "auto" else "eager")
        with torch.no_grad():
            logits[choice] = model(input_ids=ids).logits.float().cpu()
    scale = logits["eager"].abs().max()
    assert (logits["auto"] - logits["eager"]).abs().max() <= 1e-4 * scale

    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(1).integers(0, 256, 8 * 40))
    sal = {}
    for choice in ("auto", "eager"):
        monkeypatch.setenv(ATTENTION_ENV, choice)
        sal[choice] = profile(str(src), [str(data)], streamed=True, seq_len=40, batch_size=4, device="cuda",
                              dtype=torch.float32).layers
    for layer, s in sal["eager"].items():
        assert sal["auto"][layer]["freq"] == s["freq"]
        np.testing.assert_allclose(sal["auto"][layer]["reap"], s["reap"], rtol=1e-3, atol=1e-9)
