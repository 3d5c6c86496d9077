"""Running out of memory on the device: every GPU command ends in one ``error:`` line naming what
was being done and what to lower, exit 2, never a traceback (exit 3).

A CPU has no device memory to exhaust, so the allocation that fails is made where the device's
would be (building a layer's weights, the experts' forward, the head): torch's own CPU allocator
refusing a petabyte (no memory is touched), or torch's ``OutOfMemoryError``, the class CUDA raises.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from core.errors import DeviceMemoryError, RewriterError, is_out_of_memory  # noqa: E402
from profiling import deferred, streamed  # noqa: E402
from profiling.devices import Job, run_all  # noqa: E402
from profiling.streamed import GiB, check_layer_room  # noqa: E402
from tests.conftest import cli  # noqa: E402
from tests.profiling.test_streamed import _data, _source  # noqa: E402

pytestmark = [pytest.mark.torch]

CUDA_SAYS = ("CUDA out of memory. Tried to allocate 21.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
             "12.50 GiB is free.")
CUDA_LINK = "  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html)"


def test_the_message_keeps_what_torch_said_without_its_link():
    from core.errors import out_of_memory

    e = out_of_memory(torch.OutOfMemoryError(CUDA_SAYS + CUDA_LINK), "on cuda:0 running layer 3 on batch 2 of 9",
                      "lower --batch-size")
    assert str(e) == f"out of memory on cuda:0 running layer 3 on batch 2 of 9 ({CUDA_SAYS[:-1]}); lower --batch-size"


def _allocate_a_petabyte(*_: object) -> None:
    torch.empty(1 << 50, dtype=torch.uint8)  # refused by the allocator at once (ENOMEM): nothing is touched


def _cuda_out_of_memory(*_: object, **__: object) -> None:
    raise torch.OutOfMemoryError(CUDA_SAYS)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny DeepSeek-V3 (a dense first layer, then MoE layers) and calibration ids for it."""
    root = tmp_path_factory.mktemp("oom")
    src, vocab = _source("deepseek_v3", root / "src")
    return src, _data(root / "cal.jsonl", vocab), root


def _one_error_line(out: str) -> str:
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert out.startswith("error: out of memory "), out
    return out


def test_out_of_memory_is_recognised_by_what_torch_raises():
    with pytest.raises(RuntimeError) as real:
        _allocate_a_petabyte()
    assert is_out_of_memory(real.value)
    assert is_out_of_memory(torch.OutOfMemoryError(CUDA_SAYS))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"))
    assert not is_out_of_memory(RuntimeError("shape '[2, 3]' is invalid for input of size 5"))
    assert not is_out_of_memory(MemoryError())  # host memory: the CLI's own message


@pytest.mark.parametrize("command", ["profile", "eval", "eval --compare"])
def test_building_a_layer_out_of_memory_names_the_layer(model, tmp_path, monkeypatch, command):
    src, data, _ = model
    build = streamed.build

    def build_or_fail(recipe, stored, device, block):
        if recipe.key.startswith("model.layers.1."):
            _allocate_a_petabyte()
        return build(recipe, stored, device, block)

    monkeypatch.setattr(streamed, "build", build_or_fail)
    args = ["--data", data, "--seq-len", "16", "--device", "cpu", "--streamed"]
    if command == "profile":
        out = cli("profile", src, "--out", tmp_path / "s.json", "--quiet", *args, expect=2)
        assert not (tmp_path / "s.json").exists()
    else:
        out = cli("eval", src, *args, *(["--compare", src] if "compare" in command else []), expect=2)
    _one_error_line(out)
    assert out.startswith("error: out of memory on cpu building layer 1's weights (") and "MiB as " in out
    assert "can't allocate memory" in out  # what torch said
    assert "free the device (nvidia-smi lists the processes holding it" in out


def test_the_experts_and_the_head_out_of_memory_say_what_to_lower(model, monkeypatch):
    src, data, _ = model
    args = ["--data", data, "--seq-len", "16", "--batch-size", "4", "--device", "cpu", "--streamed"]
    with monkeypatch.context() as m:
        m.setattr(deferred, "run_moe", _cuda_out_of_memory)
        doc = json.loads(cli("eval", src, *args, "--json", expect=2))
        out = _one_error_line(cli("eval", src, *args, expect=2))
    assert doc == {"error": out.strip().removeprefix("error: "), "exit_status": 2}
    assert out.startswith("error: out of memory on cpu running layer 0's experts over batches 1-")
    assert f"({CUDA_SAYS.rstrip('.')})" in out
    assert "lower --gpu-memory so more hidden states stay in host memory, or lower --batch-size, " \
           "--expert-chunk or --seq-len" in out
    with monkeypatch.context() as m:
        m.setattr("quality.evaluate.reference_scores", _cuda_out_of_memory)
        out = _one_error_line(cli("eval", src, *args, expect=2))
    assert out.startswith("error: out of memory on cpu in the head (final norm, output head, logits) on batch 1 of ")


def test_the_whole_model_out_of_memory_says_to_stream(model, tmp_path, monkeypatch):
    src, data, _ = model
    monkeypatch.setattr("profiling.profile.profile_model", _cuda_out_of_memory)
    monkeypatch.setattr("quality.evaluate.score", _cuda_out_of_memory)
    common = ["--data", data, "--seq-len", "16", "--device", "cpu", "--no-streamed"]
    for out in (cli("profile", src, "--out", tmp_path / "s.json", "--quiet", *common, expect=2),
                cli("eval", src, *common, expect=2)):
        _one_error_line(out)
        assert out.startswith(f"error: out of memory running the model ({CUDA_SAYS.rstrip('.')}); run it with "
                              f"--streamed (one decoder layer at a time on the device), lower --batch-size")


def test_out_of_memory_in_a_device_process_reaches_the_parent_clearly():
    """A real allocation failure in each of two spawned processes (as ``--devices`` runs them)."""
    jobs = [Job("unused", {}, "cpu", "bfloat16", None, None)] * 2
    with pytest.raises(RewriterError) as e:
        run_all(_allocate_a_petabyte, jobs, [(), ()])
    said = str(e.value)
    assert said.startswith("out of memory in the process running on cpu ([enforce fail") and e.value.exit_code == 2
    assert "can't allocate memory" in said and said.endswith("lower --gpu-memory, --batch-size or --expert-chunk, "
                                                              "or give fewer devices")
    jobs = [Job("unused", {}, "cpu", "bfloat16", None, None)]
    with pytest.raises(RewriterError, match=r"^cpu: a layer$"):
        run_all(_raise_device_memory_error, jobs, [()])


def _raise_device_memory_error(*_: object) -> None:
    raise DeviceMemoryError("a layer")


def test_a_layer_larger_than_the_device_is_refused_before_any_read():
    check_layer_room(3, 30 * GiB, 40 * GiB, "cuda:0", torch.bfloat16, capped=False)  # fits: no error
    with pytest.raises(DeviceMemoryError) as e:
        check_layer_room(1, int(31.5 * GiB), int(30.4 * GiB), "cuda:0", torch.bfloat16, capped=False)
    assert str(e.value).startswith("cuda:0: decoder layer 1's weights need 31.5 GiB as bfloat16 plus 2 GiB of "
                                   "workspace, and 30.4 GiB are free on it (other processes may hold the rest")
    with pytest.raises(DeviceMemoryError, match="are left within --gpu-memory; .*: raise --gpu-memory, free"):
        check_layer_room(1, 10 * GiB, 11 * GiB, "cuda:0", torch.bfloat16, capped=True)


def test_recalibrate_out_of_memory_names_the_layer(tmp_path, monkeypatch):
    from tests.profiling.test_recalibrate import FIT, KEEP, _ids, _source_with_partners

    src = _source_with_partners(tmp_path / "src")
    (tmp_path / "keep.json").write_text(json.dumps({"0": KEEP, "1": KEEP}))
    cli("plan", src, "--keep-list", tmp_path / "keep.json", "--out", tmp_path / "plan.json")
    cal = _ids(tmp_path / "cal.jsonl", 8, 64, seed=0)
    run = ["recalibrate", src, "--plan", tmp_path / "plan.json", "--data", cal, "--out", tmp_path / "r.json", "--quiet",
           *FIT]
    with monkeypatch.context() as m:
        m.setattr("profiling.recalibrate.fit_layer", _cuda_out_of_memory)
        out = _one_error_line(cli(*run, expect=2))
    assert out.startswith("error: out of memory on cpu recording layer 0's routing after batch ")
    assert out.rstrip().endswith("or lower --batch-size or --seq-len")  # recalibrate has no --expert-chunk
    monkeypatch.setattr(deferred, "run_moe", _cuda_out_of_memory)  # not called: batch by batch
    build = streamed.build

    def build_or_fail(recipe, stored, device, block):
        if recipe.key.startswith("model.layers.1."):
            raise torch.OutOfMemoryError(CUDA_SAYS)
        return build(recipe, stored, device, block)

    monkeypatch.setattr(streamed, "build", build_or_fail)
    out = _one_error_line(cli(*run, expect=2))
    assert out.startswith("error: out of memory on cpu building layer 1's weights (") and CUDA_SAYS[:40] in out
    assert not (tmp_path / "r.json").exists()
