"""``inspect``, ``verify``, ``check``, ``card`` and ``cleanup``: reading, proving and publishing an output."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from rewriter.cli.errors import EXIT_FOUND, EXIT_OK
from rewriter.cli.errors import fail_cleanly as _fail_cleanly
from rewriter.cli.group import main
from rewriter.cli.params import (
    BUFFER_MIB,
    JSON_OBJECT,
    POSITIVE,
    MiB,
    finite,
)


@main.command()
@click.argument("ckpt")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--storage-options", type=JSON_OBJECT, default=None, help="fsspec options as JSON (endpoint_url, key…).")
@_fail_cleanly
def inspect(ckpt: str, as_json: bool, storage_options: dict[str, Any] | None) -> None:
    """Describe checkpoint CKPT from its headers alone: family, experts, bytes, shard locality.

    CKPT is a safetensors checkpoint (a folder or its URL) or a GGUF model (its file, or any file of a split
    GGUF).
    """
    from rewriter.tools.inspect import describe, format_description

    info = describe(ckpt, storage_options or {})
    click.echo(json.dumps(info, indent=1) if as_json else format_description(info))


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="[SRC] DST")
@click.option("--buffer-mib", type=BUFFER_MIB, default=16, show_default=True, help="Read buffer in MiB per side.")
@click.option("--src-options", type=JSON_OBJECT, default=None, help="fsspec options for SRC as JSON.")
@click.option("--dst-options", type=JSON_OBJECT, default=None, help="fsspec options for DST as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (tensors, bytes, mismatches, problems) as JSON.")
@click.option("--quiet", is_flag=True, help="No progress on stderr (a bar on a terminal, a line every few seconds otherwise).")
@click.option("--ray", "use_ray", is_flag=True, help="Check the shards in Ray tasks (pip install '.[ray]').")
@click.option("--address", default=None, help="Ray cluster address, with --ray (default: start a local one).")
@click.option("--workers", "ray_workers", type=POSITIVE, default=2, show_default=True, help="Ray tasks at a time, with --ray.")
@click.option("--ray-timeout", type=finite(0, 86400, min_open=True), default=30, show_default=True,
              help="With --ray: seconds to wait for the Ray cluster at --address to answer.")
@_fail_cleanly
def verify(paths: tuple[str, ...], buffer_mib: int, src_options: dict[str, Any] | None,
           dst_options: dict[str, Any] | None, as_json: bool, quiet: bool, use_ray: bool, address: str | None,
           ray_workers: int, ray_timeout: float) -> None:
    """Prove DST: every byte of every output tensor equals its planned slice of SRC, and every
    shard hashes to the sha256 (of the shard, or of each part) DST/pruning.json records.

    SRC defaults to the source recorded in DST/pruning.json: a remote source's URL; a local source
    is recorded by content only (no path of this machine is published), so give SRC. Exits 1 when it finds a mismatch or
    a problem, 2 when it cannot verify (DST is not an output of this tool, SRC cannot be read).
    SRC may be a GGUF model (its file, or any file of a split GGUF); DST is then a GGUF output.
    """
    if len(paths) > 2:
        raise click.UsageError("give [SRC] DST")
    src, dst = (None, paths[0]) if len(paths) == 1 else paths
    _refuse_file_as_output(dst, "DST")
    from planners.cost import human_bytes
    from rewriter.exec.publish.verify import verify as do_verify

    if use_ray:
        from rewriter.exec.distributed import verify_on_ray

        report = verify_on_ray(src, dst, address=address, workers=ray_workers, src_options=src_options or {},
                               dst_options=dst_options or {}, buffer_bytes=buffer_mib * MiB,
                               connect_timeout_s=ray_timeout)
    else:
        from rewriter.tools.progress import ByteProgress

        bar = ByteProgress(label="verify", enabled=not quiet and not as_json)

        def progress(n: int, total: int) -> None:
            if not bar.total:
                bar.start(total)
            bar(n)

        report = do_verify(src, dst, src_options=src_options or {}, dst_options=dst_options or {},
                           buffer_bytes=buffer_mib * MiB, progress=progress)
        bar.close(completed=report.ok)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
    else:
        click.echo(f"verified {report.tensors_checked} tensors, {human_bytes(report.bytes_checked)} of {report.dst} "
                   f"against {report.src}")
        for p in report.problems:
            click.echo(f"problem:  {p}")
        for m in report.mismatches[:20]:
            click.echo(f"mismatch: {m}")
        click.echo(f"mismatches: {len(report.mismatches)}, problems: {len(report.problems)} -> "
                   f"{'OK' if report.ok else 'FAILED'}")
    sys.exit(EXIT_OK if report.ok else EXIT_FOUND)


def _refuse_file_as_output(path: str, param: str) -> None:
    """An output of `run` is a folder: a local file given for one is named as such."""
    if "://" not in path and os.path.isfile(path):
        raise click.BadParameter(f"{path} is a file; give the folder `rewriter run`/`prune` wrote (it holds "
                                 f"pruning.json and the index)", param_hint=param)


@main.command()
@click.argument("ckpt")
@click.option("--target", "targets", multiple=True,
              type=click.Choice(["vllm", "sglang", "trtllm", "llamacpp", "transformers"]),
              help="Engine to check against (repeat; default: all).")
@click.option("--ep", type=click.IntRange(min=1), default=None, help="Expert-parallel size to check.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable verdicts.")
@click.option("--storage-options", type=JSON_OBJECT, default=None, help="fsspec options for CKPT as JSON.")
@_fail_cleanly
def check(ckpt: str, targets: tuple[str, ...], ep: int | None, as_json: bool, storage_options: dict[str, Any] | None) -> None:
    """Would serving engines load CKPT? Print each rule's verdict (any MoE checkpoint, from headers).

    CKPT is a safetensors checkpoint (a folder or its URL) or a GGUF model (its file, or any file of a split
    GGUF); a GGUF model's fields are read from its metadata.
    Rules and their sources: docs/serving.md. Exit status 1 when a rule fails, 2 on bad input;
    warnings do not fail.
    """
    from core.checkpoint import Checkpoint
    from planners.serving import TARGETS, check_facts, failures, format_verdicts
    from planners.serving_facts import checkpoint_facts

    c = Checkpoint.open(ckpt, storage_options or {})
    facts = checkpoint_facts(c)
    verdicts = check_facts(facts, targets or TARGETS, ep)
    if as_json:
        click.echo(json.dumps({"checkpoint": c.url, "family": facts.family, "experts_per_layer": facts.count,
                               "top_k": facts.top_k, "ep": ep, "ok": not failures(verdicts),
                               "verdicts": [v.to_json() for v in verdicts]}, indent=1))
    else:
        click.echo(f"{c.url}: {facts.family}, {facts.count_text()} experts per layer, top-k {facts.top_k}"
                   + (f", --ep {ep}" if ep else ""))
        click.echo(format_verdicts(verdicts))
    sys.exit(EXIT_FOUND if failures(verdicts) else EXIT_OK)


@main.command()
@click.argument("dst")
@click.option("--base-model", default=None, help="Hub repo id ORG/NAME of the source (default: from an hf:// source, a Hugging Face cache folder or the config).")
@click.option("--eval", "eval_json", default=None, help="A `rewriter eval --json` result to include.")
@click.option("--verify", "run_verify", is_flag=True, help="Run `rewriter verify` and include it: against --src, else "
              "the recorded source (a local source is recorded by content only: give --src).")
@click.option("--src", "src", default=None, help="The source to verify against (with --verify).")
@click.option("--src-options", type=JSON_OBJECT, default=None, help="fsspec options for the source as JSON (with --verify).")
@click.option("--dst-options", type=JSON_OBJECT, default=None, help="fsspec options for DST as JSON.")
@_fail_cleanly
def card(dst: str, base_model: str | None, eval_json: str | None, run_verify: bool, src: str | None,
         src_options: dict[str, Any] | None, dst_options: dict[str, Any] | None) -> None:
    """Write DST/README.md again from DST/pruning.json, adding eval results and verify status.

    Each run renders the whole card, so give every extra you want in it. DST may be a GGUF output
    (its card is filed under the gguf library).
    """
    from rewriter.exec.dest import open_destination
    from rewriter.exec.publish import check_base_model, load_eval, update_card

    _refuse_file_as_output(dst, "DST")
    if base_model is not None:
        check_base_model(base_model)  # before a long --verify
    destination = open_destination(dst, (dst_options or {}))
    report = None
    if run_verify:
        from rewriter.exec.publish.verify import verify as do_verify

        report = do_verify(src, dst, src_options=(src_options or {}), dst_options=(dst_options or {})).to_json()
    result = load_eval(eval_json) if eval_json else None
    update_card(destination, base_model=base_model, verify=report, eval_result=result)
    click.echo(f"wrote {destination.describe('README.md')}" + (f" (verify: {'OK' if report['ok'] else 'FAILED'})" if report else ""))


@main.command()
@click.argument("dst")
@click.option("--dst-options", type=JSON_OBJECT, default=None, help="fsspec options for DST as JSON.")
@click.option("--dry-run", is_flag=True, help="Only list what would be aborted or removed.")
@_fail_cleanly
def cleanup(dst: str, dst_options: dict[str, Any] | None, dry_run: bool) -> None:
    """Abort the multipart uploads and remove the part files and temporaries killed runs left in DST.

    Takes DST's lock first (a run still writing is never disturbed; --dry-run only reads, without
    the lock, and says when a run is in progress). A missing DST or a file is refused; a folder no
    run wrote state into is left unchanged. Finished shards stay journaled: `rewriter run` resumes
    from them; unfinished shards are written again. The status document (`rewriter status`) then
    counts only the finished shards, a run left running reads as stopped, and a note says why.
    """
    from rewriter.exec.dest.cleanup import cleanup as do_cleanup

    lines = do_cleanup(dst, dst_options or {}, dry_run=dry_run)
    for line in lines:
        click.echo(line)
    click.echo(lines.summary)
