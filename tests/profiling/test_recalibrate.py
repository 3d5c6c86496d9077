"""Router recalibration: the fit on tiny real transformers MoE layers of each supported family,
and ``rewriter recalibrate`` end to end (recalibrate -> run -> verify -> eval) on a tiny gpt-oss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from profiling.recal_fit import FitSettings, PrunedLayer, fit_layer  # noqa: E402
from profiling.recalibrate import moe_modules  # noqa: E402
from tests.conftest import cli  # noqa: E402
from tests.e2e.test_families import COMMON, FAMILIES  # noqa: E402

pytestmark = pytest.mark.torch

KEEP = [0, 2, 5, 6]  # half of 8 experts
#: Each dropped expert is a near copy of a kept one, as experts of trained models often overlap:
#: the plain prune sends their tokens to whatever ranks next, a refitted router to the copy.
PARTNER = {1: 0, 3: 2, 4: 5, 7: 6}


def _gpt_oss():
    cfg = transformers.GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                                    num_experts_per_tok=2)
    return transformers.GptOssForCausalLM(cfg)


def _family(name: str):
    if name == "gpt_oss":
        model = _gpt_oss()
    else:
        cfg_cls, model_cls, kw, _ = FAMILIES[name]
        model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**{**COMMON, **kw, "num_hidden_layers": 1}))
    model = model.float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "experts" in n:
                p.normal_(0, 0.1)
                if p.dim() >= 2 and p.shape[0] == 8:  # fused [E, ...] expert tensors
                    for dropped, kept in PARTNER.items():
                        p[dropped] = p[kept] + 0.01 * torch.randn_like(p[kept])
        for n, p in model.named_parameters():  # per-expert modules (experts.N.*), where a family has them
            parts = n.split(".")
            if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
                e = int(parts[parts.index("experts") + 1])
                if e in PARTNER:
                    p.copy_(model.get_parameter(n.replace(f"experts.{e}.", f"experts.{PARTNER[e]}.")))
        for router, _ in moe_modules(model).values():
            router.weight.normal_(0, 0.3)
            if isinstance(getattr(router, "bias", None), torch.Tensor):
                router.bias.normal_(0, 0.1)
    return model


def _layer_data(model, tokens: int = 4096, seed: int = 0):
    """Inputs of layer 0's experts module and its original output, through the module itself."""
    router, experts = moe_modules(model)[0]
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, scores, idx = router(x)
        y = experts(x, idx, scores)
    return router, experts, x, y


SETTINGS = FitSettings(steps=60, lr=0.05, batch_tokens=512)


@pytest.mark.parametrize("name", ["gpt_oss", "qwen3_moe", "qwen3_moe_unnormalized", "qwen2_moe", "mixtral", "olmoe"])
def test_pruned_routing_is_the_familys_own_and_the_fit_lowers_held_out_error(name):
    torch.manual_seed(0)
    router, experts, x, y = _layer_data(_family(name))
    k = router.top_k
    every = PrunedLayer(router, experts, torch.arange(experts.num_experts), k)
    # With every expert kept, the pruned layer computes exactly what the family's layer computes.
    torch.testing.assert_close(every.output(every.params(torch.float32), x), y, rtol=1e-4, atol=1e-5)
    pruned = PrunedLayer(router, experts, torch.tensor(KEEP), k)
    fit = fit_layer(0, pruned, x, y, SETTINGS, torch.float32)
    assert fit.accepted and fit.mse_after < 0.97 * fit.mse_before, (fit.mse_before, fit.mse_after)
    assert fit.held_out_tokens == 512 and fit.train_tokens == 3584
    assert fit.weight is not None and tuple(fit.weight.shape) == (len(KEEP), x.shape[1])
    assert (fit.bias is not None) == (name == "gpt_oss")  # only gpt-oss routers have a bias
    assert experts.num_experts == 8 and router.top_k == k  # the modules are left as they were


def test_zero_steps_is_the_plain_prune_and_the_fit_is_deterministic():
    torch.manual_seed(1)
    router, experts, x, y = _layer_data(_family("gpt_oss"))
    layer = PrunedLayer(router, experts, torch.tensor(KEEP), 2)
    zero = fit_layer(0, layer, x, y, FitSettings(steps=0), torch.bfloat16)
    assert not zero.accepted and zero.weight is None and zero.bias is None
    assert zero.mse_after == zero.mse_before > 0
    # The plain prune's parameters are the kept rows, unchanged.
    assert torch.equal(layer.params(torch.float32)["weight"], router.weight.detach()[KEEP])
    a, b = (fit_layer(0, layer, x, y, SETTINGS, torch.bfloat16) for _ in range(2))
    assert a.weight is not None and b.weight is not None and a.weight.dtype == torch.bfloat16
    assert torch.equal(a.weight, b.weight) and a.mse_after == b.mse_after
    c = fit_layer(0, layer, x, y, FitSettings(steps=60, lr=0.05, batch_tokens=512, seed=7), torch.bfloat16)
    assert c.weight is not None and not torch.equal(a.weight, c.weight)  # the seed matters


def test_a_fit_that_does_not_help_keeps_the_plain_rows():
    """A fit judged on held-out tokens it cannot improve (an absurd step size) is not kept."""
    torch.manual_seed(2)
    router, experts, x, y = _layer_data(_family("gpt_oss"))
    fit = fit_layer(0, PrunedLayer(router, experts, torch.tensor(KEEP), 2), x, y,
                    FitSettings(steps=5, lr=1e4, batch_tokens=256), torch.float32)
    assert not fit.accepted and fit.weight is None and fit.mse_after == fit.mse_before
