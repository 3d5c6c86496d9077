"""Plans that carry new router bytes, through the commands a user runs: run, verify, card, resume,
bad sidecars and plans; everything but the carried tensors is a plain prune's bytes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from core.checkpoint import Checkpoint
from planners.carried import carry_tensors
from planners.plan import Plan
from rewriter.cli import main
from tests.carried_util import METHOD, plain_and_carried, tensor_bytes
from tests.conftest import cli, tree_digest


def _fails(*args: object) -> str:
    """The one error line of a command that refuses its input (exit 2, no traceback)."""
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 2, f"exit {r.exit_code}:\n{r.output}"
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.output
    return lines[0]


def _differing_tensors(a: Path, b: Path) -> dict[str, tuple[bytes, bytes]]:
    ca, cb = Checkpoint.open(str(a)), Checkpoint.open(str(b))
    assert sorted(ca.tensors) == sorted(cb.tensors)
    return {n: (tensor_bytes(a, n), tensor_bytes(b, n)) for n in ca.tensors
            if tensor_bytes(a, n) != tensor_bytes(b, n)}


def _spans_outside(ckpt: Path, names: set[str]) -> dict[str, bytes]:
    """Every shard's bytes with the spans of ``names`` left out (headers included)."""
    c = Checkpoint.open(str(ckpt))
    out = {}
    for shard in c.shards:
        data = (ckpt / shard).read_bytes()
        cut = sorted((t.begin, t.end) for t in c.tensors.values() if t.shard == shard and t.name in names)
        pieces, pos = [], 0
        for b, e in cut:
            pieces.append(data[pos:b])
            pos = e
        out[shard] = b"".join(pieces) + data[pos:]
    return out


def test_without_carried_tensors_the_plan_and_output_are_todays(tiny, tmp_path):
    plain, _, _ = plain_and_carried(tiny, tmp_path)
    p = Plan.load(str(plain))
    same = carry_tensors(p, {}, method=METHOD)
    assert same is p and same.version == 2 and "carried" not in json.loads(plain.read_text())
    same.save(str(tmp_path / "again.json"))
    assert (tmp_path / "again.json").read_bytes() == plain.read_bytes()
    cli("run", tmp_path / "again.json", "--out", tmp_path / "again", "--quiet")
    assert tree_digest(tmp_path / "again") == tree_digest(tmp_path / "plain")
    assert "carried" not in json.loads((tmp_path / "plain" / "pruning.json").read_text())
    assert "New tensors" not in (tmp_path / "plain" / "README.md").read_text()


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_only_the_carried_tensors_differ_from_a_plain_prune(preset, tiny, tmp_path):
    if preset == "small":  # routers of 16 of 32 experts x 512: more than a plan holds inline
        from rewriter.tools.synth import PRESETS, write_checkpoint

        src = tmp_path / "src"
        write_checkpoint(src, PRESETS["small"])
    else:
        src = tiny
    _, carried, new = plain_and_carried(src, tmp_path)
    doc = json.loads(carried.read_text())
    sidecars = list(carried.parent.glob("carried-*.safetensors"))
    assert doc["version"] == 3 and (len(sidecars) == 1) == (preset == "small")
    assert ("sidecar" in doc["carried"]) == (preset == "small") and ("inline" in doc["carried"]) == (preset == "tiny")
    out = cli("run", carried, "--out", tmp_path / "dst", "--quiet")
    assert "wrote" in out
    plain, dst = tmp_path / "plain", tmp_path / "dst"
    differ = _differing_tensors(plain, dst)
    assert sorted(differ) == sorted(new)
    assert all(differ[n][1] == new[n] for n in new)
    assert _spans_outside(plain, set(new)) == _spans_outside(dst, set(new))
    a, b = tree_digest(plain), tree_digest(dst)
    assert {n for n in a if a[n] != b.get(n)} == {*Checkpoint.open(str(dst)).shards, "pruning.json", "README.md"}
    assert sorted(a) == sorted(b)
    assert "OK" in cli("verify", src, dst)
    prov = json.loads((dst / "pruning.json").read_text())
    sha = prov["carried"]["tensors"]
    assert prov["carried"]["method"] == METHOD and sorted(sha) == sorted(new)
    card = (dst / "README.md").read_text()
    assert "## New tensors" in card and "router recalibration" in card
    assert all(f"`{name}`" in card and sha[name] in card for name in new)


def test_verify_names_a_tampered_carried_tensor_without_the_sidecar(tmp_path):
    from rewriter.tools.synth import PRESETS, write_checkpoint

    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["small"])
    _, carried, new = plain_and_carried(src, tmp_path)
    cli("run", carried, "--out", tmp_path / "dst", "--quiet")
    shutil.rmtree(tmp_path / "carried")  # verify needs only the sha256 in pruning.json
    assert "OK" in cli("verify", src, tmp_path / "dst")
    name = sorted(new)[-1]
    t = Checkpoint.open(str(tmp_path / "dst")).tensors[name]
    with open(tmp_path / "dst" / t.shard, "r+b") as f:
        f.seek(t.begin + 3)
        b = f.read(1)
        f.seek(t.begin + 3)
        f.write(bytes([b[0] ^ 1]))
    out = cli("verify", src, tmp_path / "dst", expect=1)
    assert f"mismatch: {name}" in out and "FAILED" in out
    assert sum(line.startswith("mismatch:") for line in out.splitlines()) == 1


def _small_carried(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    from rewriter.tools.synth import PRESETS, write_checkpoint

    src = tmp_path / "src"
    write_checkpoint(src, PRESETS["small"])
    _, carried, new = plain_and_carried(src, tmp_path)
    return src, carried, new


def _sidecar(carried: Path) -> Path:
    return next(carried.parent.glob("carried-*.safetensors"))


def _flip_last_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))


def _rewrite_sidecar(p: Path, rename: dict[str, str] | None = None, shape_of: str | None = None) -> None:
    """The sidecar with tensors renamed, or one tensor's declared shape one byte shorter."""
    from core.format import encode_header, parse_header, read_prefix

    raw = p.read_bytes()
    n = read_prefix(raw[:8], str(p))
    h = parse_header(raw[8:8 + n], str(p))
    items = [((rename or {}).get(e.name, e.name), "U8", (e.nbytes - (e.name == shape_of),)) for e in h.tensors]
    body = b"".join(raw[h.data_start + e.start:h.data_start + e.end - (e.name == shape_of)] for e in h.tensors)
    p.write_bytes(encode_header(items) + body)


@pytest.mark.parametrize("damage", ["missing", "fifo", "changed", "truncated", "foreign", "wrong-length", "empty",
                                    "not-safetensors"])
def test_a_bad_sidecar_is_refused_before_anything_is_written(damage, tmp_path):
    src, carried, new = _small_carried(tmp_path)
    side = _sidecar(carried)
    name = sorted(new)[-1]
    if damage in ("missing", "fifo"):
        side.unlink()
        if damage == "fifo":  # refused without opening it (an open would block)
            os.mkfifo(side)
    elif damage == "changed":
        _flip_last_byte(side)
    elif damage == "truncated":
        side.write_bytes(side.read_bytes()[:-5])
    elif damage in ("empty", "not-safetensors"):
        side.write_bytes(b"" if damage == "empty" else b"x" * 8)
    elif damage == "foreign":
        _rewrite_sidecar(side, rename={name: "model.layers.9.mlp.router.weight"})
    else:
        _rewrite_sidecar(side, shape_of=name)
    line = _fails("run", carried, "--out", tmp_path / "dst", "--quiet")
    assert side.name in line
    expected = {"missing": "not found", "fifo": "is a FIFO", "changed": "does not have the sha256", "truncated": "is truncated",
                "foreign": "holds no tensor", "wrong-length": "U8[", "empty": "(file is 0 bytes long",
                "not-safetensors": "(header length"}[damage]
    assert expected in line and line.count(side.name) == 1, line
    if damage not in ("missing", "fifo", "empty", "not-safetensors"):
        assert name in line, line
    assert not (tmp_path / "dst").exists() or not list((tmp_path / "dst").glob("*.safetensors"))


def _edit_plan(carried: Path, edit) -> Path:
    doc = json.loads(carried.read_text())
    edit(doc)
    carried.write_text(json.dumps(doc))
    return carried


def _carry_an_expert(doc: dict) -> None:
    t = next(t for o in doc["outputs"] for t in o["tensors"] if ".experts." in t["name"])
    n = sum(s[2] for s in t["segments"])
    t["segments"] = [{"carried": "a" * 64, "length": n}]
    _record(doc, t["name"], "a" * 64, n)


def _name_a_non_output(doc: dict) -> None:
    _record(doc, "model.layers.7.mlp.router.weight", "b" * 64, 2)


def _record(doc: dict, name: str, sha: str, n: int) -> None:
    doc["carried"]["tensors"][name] = sha
    if "inline" in doc["carried"]:
        doc["carried"]["inline"][name] = "00" * n


@pytest.mark.parametrize("edit, expected", [
    (_carry_an_expert, "it is an expert's tensor"),
    (_name_a_non_output, "'model.layers.7.mlp.router.weight' is listed in 'carried.tensors' but is not an output tensor"),
])
def test_a_plan_carrying_what_it_may_not_is_refused_by_run_and_verify(edit, expected, tiny, tmp_path):
    _, carried, _ = plain_and_carried(tiny, tmp_path)
    cli("run", carried, "--out", tmp_path / "dst", "--quiet")
    # The same edit in the plan file (run) and in the plan pruning.json records (verify).
    assert expected in _fails("run", _edit_plan(carried, edit), "--out", tmp_path / "dst2", "--quiet")
    prov = tmp_path / "dst" / "pruning.json"
    doc = json.loads(prov.read_text())
    edit(doc["plan"])
    prov.write_text(json.dumps(doc))
    assert expected in _fails("verify", tiny, tmp_path / "dst")


def test_inline_bytes_of_the_wrong_length_are_refused(tiny, tmp_path):
    _, carried, new = plain_and_carried(tiny, tmp_path)
    name = sorted(new)[0]

    def shorten(doc: dict) -> None:
        doc["carried"]["inline"][name] = doc["carried"]["inline"][name][:-2]

    line = _fails("run", _edit_plan(carried, shorten), "--out", tmp_path / "dst", "--quiet")
    assert name in line and "bytes" in line and str(carried) in line


@pytest.mark.parametrize("sidecar", ["carried-\x00.safetensors", "..\\carried.safetensors", "a\\b.safetensors",
                                     "../carried.safetensors", ".carried.safetensors"])
def test_a_sidecar_name_that_is_not_a_plain_file_name_is_refused(sidecar, tiny, tmp_path):
    _, carried, _ = plain_and_carried(tiny, tmp_path)

    def point_elsewhere(doc: dict) -> None:
        del doc["carried"]["inline"]
        doc["carried"]["sidecar"] = sidecar

    _edit_plan(carried, point_elsewhere)
    for args in (["run", carried, "--out", tmp_path / "dst", "--quiet"], ["dry-run", carried]):
        line = _fails(*args)
        assert "'carried.sidecar'" in line and str(carried) in line, line
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("kind, named", [("pca-refit", True), ("x\x1b[2J`\n# Title", False)])
def test_the_card_names_a_method_kind_only_when_it_is_plain_text(kind, named, tiny, tmp_path):
    _, carried, _ = plain_and_carried(tiny, tmp_path)
    _edit_plan(carried, lambda doc: doc["carried"]["method"].__setitem__("kind", kind))
    cli("run", carried, "--out", tmp_path / "dst", "--quiet")
    for written_by in ("run", "card"):
        if written_by == "card":
            cli("card", tmp_path / "dst")
        card = (tmp_path / "dst" / "README.md").read_text()
        assert ("made by `pca-refit`." in card) == named and ("made by the method below." in card) != named, card
        assert "\x1b" not in card and "\n# Title" not in card  # shown only JSON-escaped in the method block
        assert json.dumps(kind) in card


@pytest.mark.slow
def test_killed_run_of_a_carried_plan_resumes_byte_identical(tmp_path):
    from tests.exec.test_executor import _kill_when, _run_cmd

    _, carried, _ = _small_carried(tmp_path)
    ref = tmp_path / "ref"
    subprocess.run(_run_cmd(carried, ref), check=True)
    expected = tree_digest(ref)
    dst = tmp_path / "dst"
    status = _kill_when(_run_cmd(carried, dst, "--no-zero-copy", "--buffer-mib", "1"),
                        lambda: any((dst / ".rewriter" / "tmp").glob("*.part")))
    assert status == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run(_run_cmd(carried, dst), check=True)
    assert tree_digest(dst) == expected
    assert not (dst / ".rewriter").exists()
