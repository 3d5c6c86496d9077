"""Every option of a run is defined once, by its RunOptions field: run, prune, soft-prune, submit
and the Ray job entry point take it the same way, and the CLI hands the run one RunOptions in the
library's units."""

from __future__ import annotations

import dataclasses

import pytest

from planners.reads import DEFAULT_MAX_GAP
from rewriter.cli import main
from rewriter.cli.jobs import NOT_FORWARDED
from rewriter.cli.runopts import declared, options_from
from rewriter.exec.options import IOOptions, RunOptions

MiB = 1 << 20
#: Fields no shared flag sets: each command gives them (run --src-options, prune's policy...).
SET_BY_EACH_COMMAND = {"src_options", "allow_nonuniform", "max_task_retries"}
COMMANDS = ("run", "prune", "soft-prune", "submit")


def _params(command: str) -> dict[str, list]:
    by_flag: dict[str, list] = {}
    for p in main.commands[command].params:
        for flag in getattr(p, "opts", []):
            by_flag.setdefault(flag, []).append(p)
    return by_flag


def test_every_field_has_a_flag_or_is_set_by_each_command():
    names = {name for name, *_ in declared()}
    fields = {f.name for f in dataclasses.fields(RunOptions)} | {f.name for f in dataclasses.fields(IOOptions)}
    assert fields - names - {"io", "segment_threads"} == SET_BY_EACH_COMMAND


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_takes_every_run_option_once_and_the_same_way(command):
    params = _params(command)
    run = _params("run")
    for name, _, flag, _ in declared():
        if command == "submit" and name in NOT_FORWARDED:
            # The job runs on the cluster it is submitted to (submit's own --address is the job service).
            assert all(p.help != flag.help for p in params.get(flag.flag, [])), flag.flag
            continue
        assert [p.name for p in params.get(flag.flag, [])] == [name], f"{command} {flag.flag}"
        mine, theirs = params[flag.flag][0], run[flag.flag][0]
        assert (mine.help, mine.default, type(mine.type), mine.is_flag) == (
            flag.help, theirs.default, type(theirs.type), theirs.is_flag)


def test_the_ray_job_entry_point_is_run_with_every_option(capsys):
    from ray_jobs import rewrite

    with pytest.raises(SystemExit) as e:
        rewrite.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert [flag.flag for _, _, flag, _ in declared() if flag.flag not in out] == []


def test_no_option_given_is_the_library_default():
    ctx = main.commands["run"].make_context("run", ["plan.json", "--out", "dst"])
    assert options_from(dict(ctx.params)) == RunOptions()
    assert RunOptions().io.max_gap == DEFAULT_MAX_GAP  # the run reads as the plan's cost estimate assumes


def test_flags_in_their_units_become_the_library_units():
    argv = ["plan.json", "--out", "dst", "--buffer-mib", "3", "--max-inflight-mib", "0", "--max-gap-kib", "2",
            "--jobs", "2", "--no-zero-copy", "--part-mib", "128", "--ray-timeout", "5", "--workers", "3", "--ray"]
    values = dict(main.commands["run"].make_context("run", argv).params)
    got = options_from(values, src_options={"a": 1}, allow_nonuniform=True)
    assert got == RunOptions(buffer_bytes=3 * MiB, zero_copy=False, part_bytes=128 * MiB, connect_timeout_s=5,
                             workers=3, ray=True, src_options={"a": 1}, allow_nonuniform=True,
                             io=IOOptions(inflight_bytes=0, max_gap=2048, jobs=2))
    assert set(values) == {"plan_file", "dst", "allow_nonuniform", "src_options", "quiet", "as_json"}
