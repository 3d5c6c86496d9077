"""CLI fuzz: random combinations of options and values for plan, prune, soft-prune, run, verify and
dry-run on a tiny checkpoint. Whatever the combination: no traceback, an exit status from the
documented set, JSON on stdout under --json, an untouched source, and no run blocked by what an
earlier failure left behind.

Seeded and a fixed number of cases (``REWRITER_FUZZ_CASES``, default 600) so that a failure
replays; the failing case's command line is in the assertion message.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from rewriter.cli import main
from rewriter.tools.synth import PRESETS, synthetic_saliency, write_checkpoint
from tests.conftest import cli, source_digest

CASES = int(os.environ.get("REWRITER_FUZZ_CASES", "600"))
SEED = int(os.environ.get("REWRITER_FUZZ_SEED", "12"))
DOCUMENTED = {0, 1, 2}  # 3 is a bug and 130 needs a Ctrl-C


class World:
    """The files the fuzzer draws arguments from, good and bad."""

    def __init__(self, root: Path):
        self.root = root
        self.src = root / "src"
        write_checkpoint(self.src, PRESETS["tiny"])
        (self.src / "tokenizer.json").write_text('{"version": "1.0"}\n')
        self.sal = root / "sal.json"
        cli("synth-saliency", self.src, "--out", self.sal, "--domain", "code")
        self.sal2 = root / "sal2.json"
        cli("synth-saliency", self.src, "--out", self.sal2, "--domain", "prose", "--seed", "3")
        other = root / "bf16"
        write_checkpoint(other, PRESETS["tiny-bf16"])
        self.foreign = root / "foreign.json"
        cli("synth-saliency", other, "--out", self.foreign)
        self.old = root / "old.json"
        synthetic_saliency(2, 8, 2).save(self.old)
        self.text = root / "notes.txt"
        self.text.write_text("not json")
        self.keep_lists = {}
        for name, doc in {"good": {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}, "dup": {"0": [1, 1, 2, 3], "1": [0, 1, 2, 3]},
                          "uneven": {"0": [0, 1, 2], "1": [0, 1, 2, 3, 4]}, "range": {"0": [0, 9], "1": [0, 1]},
                          "short": {"0": [0, 1]}, "list": [[0, 1]]}.items():
            p = root / f"keep-{name}.json"
            p.write_text(json.dumps(doc))
            self.keep_lists[name] = p
        self.plan = root / "plan.json"
        cli("plan", self.src, "--saliency", self.sal, "--keep-frac", "0.5", "--out", self.plan)
        self.layer_plan = root / "layer-plan.json"
        cli("plan", self.src, "--saliency", self.sal, "--keep-frac", "0.5", "--layers", "1", "--out", self.layer_plan)
        self.hostile = self._hostile_plans(json.loads(self.plan.read_text()))
        self.done = root / "done"
        cli("run", self.plan, "--out", self.done)
        self.foreign_dir = root / "someone-elses"
        self.foreign_dir.mkdir()
        (self.foreign_dir / "data.bin").write_bytes(b"keep me")
        # Other spellings of the source: '..', a symlinked parent, and a folder holding a hard link
        # of one of its shards (a bind mount needs root, so the identity tests cover it).
        self.src_aliases: list[Path] = [self.foreign_dir / ".." / "src", root / "link-to-root" / "src"]
        (root / "link-to-root").symlink_to(root)
        self.linked = root / "linked"
        self.linked.mkdir()
        os.link(sorted(self.src.glob("*.safetensors"))[0], self.linked / "model-00000-of-00002.safetensors")
        self.counter = 0

    def _hostile_plans(self, doc: dict) -> list[Path]:
        """Edited copies of a good plan that must each be refused: a config the source does not
        imply, a copied file's digest, names a terminal misreads."""
        edits = {
            "auto-map": lambda d: d["config"].update(auto_map={"AutoModelForCausalLM": "evil.Model"}),
            "rope": lambda d: d["config"].update(rope_theta=1),
            "count": lambda d: (d["config"].update(num_local_experts=3), d["config_patch"].update(num_local_experts=3)),
            "top-k": lambda d: d["config"].update(num_experts_per_tok=10**9),
            "digest": lambda d: d["copy_file_digests"]["tokenizer.json"].update(sha256="0" * 64),
            "hidden": lambda d: d["outputs"][0].update(name=".safetensors"),
            "esc": lambda d: d["outputs"][0].update(name="a\x1b[2J.safetensors"),
            "rtl": lambda d: d["outputs"][0].update(name="model-\u202egpj.safetensors"),
            "newline": lambda d: (d["copy_files"].append("a\nb.json"),
                                  d["copy_file_digests"].update({"a\nb.json": {"size": 0, "sha256": "0" * 64}})),
        }
        out = []
        for name, edit in edits.items():
            edited = json.loads(json.dumps(doc))
            edit(edited)
            p = self.root / f"hostile-{name}.json"
            p.write_text(json.dumps(edited))
            out.append(p)
        return out

    def fresh(self, stem: str = "out") -> Path:
        self.counter += 1
        return self.root / "fresh" / f"{stem}{self.counter}"


def _pick(rng: random.Random, *values: object) -> str:
    return str(rng.choice(values))


def _val(rng: random.Random, good: tuple[object, ...], bad: tuple[object, ...]) -> list[str]:
    """Mostly a valid value, so that cases reach real work; sometimes a bad one."""
    return [_pick(rng, *(good if rng.random() < 0.85 else bad))]


def _policy_args(rng: random.Random, w: World) -> list[str]:
    args: list[str] = []
    source = rng.random()
    if source < 0.6:
        for _ in range(rng.choice([1, 1, 2])):
            args += ["--saliency", *_val(rng, (w.sal, w.sal2, w.old), (w.foreign, w.text, w.root / "missing.json",
                                                                      w.src / "config.json", w.root))]
    elif source < 0.85:
        args += ["--keep-list", *_val(rng, (w.keep_lists["good"], w.keep_lists["uneven"]),
                                      (*w.keep_lists.values(), w.text, w.root / "missing.json"))]
    choices: dict[str, Callable[[], list[str]]] = {
        "--keep-n": lambda: _val(rng, (2, 4, 8), (0, -3, 9, "four")),
        "--keep-multiple": lambda: _val(rng, (1, 2, 4), (0, -1, 3, 16)),
        "--core-top-m": lambda: _val(rng, (0, 1, 2), (-1, 8, 9)),
        "--coverage": lambda: _val(rng, (0.5, 0.9, 1), (0, 2, -1, "nan", "inf")),
        "--top-k": lambda: _val(rng, (1, 2), (0, -2, 4, 8, 9)),
        "--budget": lambda: _val(rng, (4, 6, 9, 16), (0, -1, 17)),
        "--rank": lambda: _val(rng, ("freq", "reap", "eaft_reap"), ("random",)),
        "--weight": lambda: _val(rng, ("code=2", "prose=0.5"), ("code=0", "code=-1", "nope=1", "code", "code=x")),
        "--max-shard-size": lambda: _val(rng, ("5GB", "50KB", "2.5MB", "1e3"), ("1KiB", "1", "0", "-5MB", "lots")),
        "--storage-options": lambda: _val(rng, ("{}",), ("[1]", "not json", '"s"')),
        "--allow-nonuniform": lambda: [],
        "--allow-foreign-saliency": lambda: [],
    }
    for opt in rng.sample(sorted(choices), rng.randint(0, 2)):
        args += [opt, *choices[opt]()]
    if "--keep-n" not in args and "--budget" not in args and rng.random() < 0.95:
        args += ["--keep-frac", *_val(rng, (0.5, 0.25, 0.75, 1), (0, -0.5, 2, "nan", "x", "1e-9"))]
    return args


def _run_args(rng: random.Random, w: World) -> list[str]:
    choices: dict[str, Callable[[], list[str]]] = {
        "--buffer-mib": lambda: _val(rng, (1, 16), (0, -1, "big")),
        "--force": lambda: [],
        "--no-zero-copy": lambda: [],
        "--drop-cache": lambda: [],
        "--quiet": lambda: [],
        "--json": lambda: [],
        "--dst-options": lambda: _val(rng, ("{}",), ("[1]", "{")),
    }
    args: list[str] = []
    for opt in rng.sample(sorted(choices), rng.randint(0, 3)):
        args += [opt, *choices[opt]()]
    return args


def _dst(rng: random.Random, w: World) -> str:
    return _val(rng, (w.fresh(),), (w.done, w.text, w.foreign_dir, w.src, w.src / "inside", "/proc/no-such-dir/x",
                                    *w.src_aliases, w.linked))[0]


def gen_plan(rng: random.Random, w: World) -> list[str]:
    args = ["plan", str(w.src), *_policy_args(rng, w)]
    extra: dict[str, Callable[[], list[str]]] = {
        "--layers": lambda: [_pick(rng, "0", "1", "0,1", "1,1", "7", "x,1", "", "-1")],
        "--out": lambda: [_pick(rng, w.fresh("plan"), w.plan, w.src / "config.json", w.text / "p.json", w.root)],
        "--json": lambda: [],
        "--verbose": lambda: [],
        "--workers": lambda: [_pick(rng, 1, 4, 0, -2)],
        "--read-mbps": lambda: [_pick(rng, 100, 0.5, 0, -1, "fast")],
        "--buffer-mib": lambda: [_pick(rng, 1, 16, 0, -1)],
        "--measure-bandwidth": lambda: [_pick(rng, w.root / "missing-dir", w.text)],
    }
    for opt in rng.sample(sorted(extra), rng.randint(0, 3)):
        args += [opt, *extra[opt]()]
    return args


def gen_prune(rng: random.Random, w: World) -> list[str]:
    cmd = rng.choice(["prune", "prune", "soft-prune"])
    args = [cmd, str(w.src), _dst(rng, w), *_policy_args(rng, w), *_run_args(rng, w)]
    if rng.random() < 0.2:
        args += ["--plan-out", _pick(rng, w.fresh("plan"), w.src / "config.json", w.text / "p.json")]
    if rng.random() < 0.2:
        args.append("--verbose")
    return args


def gen_run(rng: random.Random, w: World) -> list[str]:
    plan = _pick(rng, w.plan, w.plan, w.plan, w.layer_plan, w.text, w.src / "config.json", w.root / "missing.json",
                 w.sal, w.root, *w.hostile)
    args = ["run", plan, *_run_args(rng, w)]
    if rng.random() < 0.9:
        args += ["--out", _dst(rng, w)]
    if rng.random() < 0.2:
        args += ["--src-options", _pick(rng, "{}", "[]")]
    if rng.random() < 0.2:
        args.append("--allow-nonuniform")
    return args


def gen_verify(rng: random.Random, w: World) -> list[str]:
    targets = [w.done, w.done, w.src, w.text, w.root / "missing", w.foreign_dir]
    paths = [_pick(rng, *targets) for _ in range(rng.choice([1, 1, 2, 2, 3]))]
    args = ["verify", *paths]
    if rng.random() < 0.3:
        args += ["--buffer-mib", _pick(rng, 1, 4, 0, -1)]
    if rng.random() < 0.3:
        args.append("--json")
    if rng.random() < 0.1:
        args += ["--src-options", _pick(rng, "{}", "[1]")]
    return args


def gen_dry_run(rng: random.Random, w: World) -> list[str]:
    args = ["dry-run", str(w.src), *_policy_args(rng, w)]
    for _ in range(rng.choice([0, 1, 1, 2])):
        args += ["--layer", _pick(rng, 0, 1, 1, 7, -1, "x")]
    extra: dict[str, Callable[[], list[str]]] = {
        "--scratch": lambda: [_pick(rng, w.fresh("scratch"), w.text)],
        "--buffer-mib": lambda: [_pick(rng, 1, 16, 0, -1)],
        "--no-zero-copy": lambda: [],
        "--json": lambda: [],
    }
    for opt in rng.sample(sorted(extra), rng.randint(0, 2)):
        args += [opt, *extra[opt]()]
    return args


GENERATORS = [gen_plan, gen_plan, gen_prune, gen_prune, gen_run, gen_verify, gen_dry_run]


def check_outcome(args: list[str], status: int, stdout: str, output: str) -> None:
    line = shlex.join(["rewriter", *args])
    assert status in DOCUMENTED, f"{line}\nexit {status}:\n{output}"
    assert "Traceback" not in output, f"{line}\n{output}"
    assert "internal error" not in output, f"{line}\n{output}"
    if "--json" in args and "--help" not in args and (status != 0 or args[0] != "verify" or stdout.strip()):
        try:
            doc = json.loads(stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"{line}\nexit {status}, stdout is not JSON:\n{output}") from None
        if status == 2:
            assert isinstance(doc, dict) and doc["exit_status"] == 2 and doc["error"], line
    elif status == 2:
        errors = [x for x in output.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1, f"{line}\n{output}"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.timeout(300)
def test_cli_fuzz_in_process(world):
    rng = random.Random(SEED)
    before = source_digest(world.src)
    statuses: dict[int, int] = {}
    failed_fresh: list[Path] = []
    for _ in range(CASES):
        args = rng.choice(GENERATORS)(rng, world)
        r = CliRunner().invoke(main, args)
        assert r.exception is None or isinstance(r.exception, SystemExit), \
            f"{shlex.join(args)}\n{r.exception!r}\n{r.output}"
        check_outcome(args, r.exit_code, r.stdout, r.output)
        statuses[r.exit_code] = statuses.get(r.exit_code, 0) + 1
        if args[0] == "prune" and r.exit_code == 2 and str(world.root / "fresh") in args[2]:
            failed_fresh.append(Path(args[2]))
    assert source_digest(world.src) == before
    for hostile in world.hostile:  # each refused: one error line, nothing written
        out = cli("run", hostile, "--out", world.root / "hostile-out", expect=2)
        assert out.startswith(f"error: {hostile}"), out
    assert not (world.root / "hostile-out" / "config.json").exists()
    # A completed destination stays a complete, verifiable output whatever was thrown at it
    # (--force may have replaced it with the output of another plan).
    assert cli("verify", world.src, world.done).strip().endswith("OK")
    # Both outcomes happened often: the fuzzer reached real work, not only option parsing.
    assert statuses.get(0, 0) > CASES // 10 and statuses.get(2, 0) > CASES // 10, statuses
    # Whatever a failed prune left behind does not block the same destination.
    for dst in failed_fresh[:10]:
        cli("prune", world.src, dst, "--saliency", world.sal, "--keep-frac", "0.5")
        assert cli("verify", world.src, dst).strip().endswith("OK")


@pytest.mark.slow
def test_cli_fuzz_real_processes(world):
    rng = random.Random(SEED + 1)
    before = source_digest(world.src)
    for _ in range(6):
        args = rng.choice(GENERATORS)(rng, world)
        p = subprocess.run([sys.executable, "-m", "rewriter.cli", *args], capture_output=True, text=True,
                           check=False, timeout=120)
        check_outcome(args, p.returncode, p.stdout, p.stdout + p.stderr)
    assert source_digest(world.src) == before


# --- hostile inputs, each a fixed seed: whatever the command, a refusal (exit 2) naming the file -----

DEEP = "[" * 100_000 + "]" * 100_000  # nesting that makes Python's JSON parser recurse past its limit
# An integer longer than Python converts from text (its int_max_str_digits), where a number belongs.
LONG_NUMBER = '{"version": 1' + "0" * 5000 + "}"
#: Each hostile document, and what the refusal says of it.
HOSTILE_DOCS = {"deep": (DEEP, "nested deeper than"), "long number": (LONG_NUMBER, "a number of 5,001 digits")}


@pytest.fixture(scope="module", params=sorted(HOSTILE_DOCS))
def hostile(world, request) -> dict[str, Path | str]:
    """Files and folders that hold a hostile JSON document in each place a command reads JSON."""
    import shutil

    doc, _ = HOSTILE_DOCS[request.param]
    root = world.root / f"hostile {request.param}"
    root.mkdir()
    deep = root / "deep.json"
    deep.write_text(doc)
    out = {"deep": deep}
    for name, base, inner in (("config", world.src, "config.json"), ("index", world.src, "model.safetensors.index.json"),
                              ("provenance", world.done, "pruning.json"), ("card", world.done, None)):
        copy = root / name
        shutil.copytree(base, copy)
        if inner:
            (copy / inner).write_text(doc)
        out[name] = copy
    return {**out, "said": HOSTILE_DOCS[request.param][1]}


HOSTILE_SEEDS = {
    "plan file to run": (["run", "{deep}", "--out", "{fresh}"], "{deep}"),
    "plan file to dry-run": (["dry-run", "{deep}"], "{deep}"),
    "saliency file": (["plan", "{src}", "--saliency", "{deep}", "--keep-frac", "0.5"], "{deep}"),
    "keep list": (["plan", "{src}", "--keep-list", "{deep}"], "{deep}"),
    "saliency to stability": (["stability", "{deep}", "{sal}", "--keep-frac", "0.5"], "{deep}"),
    "config.json to plan": (["plan", "{config}", "--saliency", "{sal}", "--keep-frac", "0.5"], "config.json"),
    "config.json to inspect": (["inspect", "{config}"], "config.json"),
    "index to inspect": (["inspect", "{index}"], "model.safetensors.index.json"),
    "pruning.json to verify": (["verify", "{provenance}"], "pruning.json"),
    "pruning.json to status": (["status", "{provenance}"], "pruning.json is not a provenance file"),
    "pruning.json to card": (["card", "{provenance}"], "pruning.json"),
    "eval file to card": (["card", "{card}", "--eval", "{deep}"], "{deep}"),
}


@pytest.mark.parametrize("seed", sorted(HOSTILE_SEEDS))
def test_hostile_json_is_refused_naming_the_file(world, hostile, seed):
    template, names = HOSTILE_SEEDS[seed]
    said = hostile["said"]
    paths = {**{k: str(v) for k, v in hostile.items()}, "src": str(world.src), "sal": str(world.sal),
             "fresh": str(world.fresh())}
    args = [a.format(**paths) for a in template]
    for as_json in (False, True):
        argv = args + (["--json"] if as_json and args[0] not in ("status", "card") else [])
        r = CliRunner().invoke(main, argv)
        assert r.exception is None or isinstance(r.exception, SystemExit), f"{shlex.join(argv)}\n{r.exception!r}"
        check_outcome(argv, r.exit_code, r.stdout, r.output)
        assert r.exit_code == 2, f"{shlex.join(argv)}\n{r.output}"
        message = json.loads(r.stdout)["error"] if "--json" in argv else r.output
        assert names.format(**paths) in message, f"{shlex.join(argv)}\n{r.output}"
        assert said in message or args[0] == "status", f"{shlex.join(argv)}\n{r.output}"


HUB = "hf://openai/gpt-oss-20b"


@pytest.mark.parametrize("offline", [False, True], ids=["no-network", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("command", [["inspect", HUB], ["check", HUB], ["plan", HUB, "--keep-frac", "0.5"]],
                         ids=["inspect", "check", "plan"])
def test_hub_source_without_network_is_refused_with_the_offline_way(world, command, offline):
    """This machine reaches no Hub; the same holds on any machine with HF_HUB_OFFLINE=1."""
    args = command + (["--saliency", str(world.sal)] if command[0] == "plan" else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"} if offline else {
        **os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # a closed port: no network
    p = subprocess.run([sys.executable, "-m", "rewriter.cli", *args], capture_output=True, text=True,
                       check=False, timeout=120, env=env)
    check_outcome(args, p.returncode, p.stdout, p.stdout + p.stderr)
    assert p.returncode == 2, p.stdout + p.stderr
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert HUB in line and "local snapshot" in line and "hf download openai/gpt-oss-20b" in line, line
    assert ("HF_HUB_OFFLINE is set" in line) == offline, line
