"""``synth`` and ``synth-saliency``: synthetic checkpoints and saliency."""

from __future__ import annotations

import dataclasses
import os

import click

from core.errors import count
from rewriter.cli.errors import fail_cleanly as _fail_cleanly
from rewriter.cli.errors import on_interrupt
from rewriter.cli.group import main
from rewriter.cli.params import (
    DOMAIN,
    refuse_existing_file,
    save_saliency,
)

#: Released MoE models have at most about a hundred decoder layers; a typo's 100,000 would spend
#: minutes building headers before writing anything.
MAX_LAYERS = 1024


@main.command()
@click.option("--preset", required=True,
              help="Geometry: gpt-oss 20b, 120b, tiny, tiny-bf16, small; the published geometries of deepseek-v3, "
                   "deepseek-r1, kimi-k2 (FP8 block-scaled experts), qwen3-235b, qwen3-coder-480b, glm-4.5 "
                   "(BF16); deepseek-v3-mini (DeepSeek-V3 architecture at test size).")
@click.option("--layers", type=click.IntRange(1, MAX_LAYERS), default=None,
              help="Keep the preset's per-layer geometry with N decoder layers (dense-first layers kept while "
                   "one MoE layer remains; MTP layers kept after them).")
@click.option("--sparse", is_flag=True, help="Real headers over holes: full geometry at no disk cost.")
@click.option("--computing", is_flag=True,
              help="Weights that compute (finite, unit-scale activations): for profile and eval runs.")
@click.option("--force", is_flag=True, help="Write into OUT even when it is not empty (same-named files are replaced).")
@click.option("--quiet", is_flag=True, help="No progress.")
@click.argument("out", type=click.Path(file_okay=False))
@_fail_cleanly
def synth(preset: str, layers: int | None, sparse: bool, computing: bool, force: bool, quiet: bool, out: str) -> None:
    """Write a synthetic checkpoint (gpt-oss, or a per-expert MoE at a published geometry) to OUT (a new
    or empty folder)."""
    from core.format import nbytes_of
    from rewriter.tools.progress import ByteProgress
    from rewriter.tools.synth import all_tensors, holds_only_temporaries, write_checkpoint
    from rewriter.tools.synth import preset as get_preset
    from rewriter.tools.synth_data import computing_chunks

    try:
        g = get_preset(preset, layers)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--preset") from None
    if computing and sparse:
        raise click.BadParameter("a sparse checkpoint has no weights to compute with", param_hint="--computing")
    if os.path.isdir(out) and not holds_only_temporaries(out) and not force:
        raise click.BadParameter(f"{out} is not empty; refusing to mix two checkpoints in one folder: choose "
                                 f"a new folder or pass --force to write into it anyway", param_hint="OUT")
    on_interrupt(lambda: f"{out} holds no finished file yet; run the same command again"
                 if not os.path.isdir(out) or holds_only_temporaries(out)
                 else f"{out} holds a partial checkpoint; run the same command with --force to write it again")
    bar = ByteProgress(label="synth", enabled=not quiet and not sparse)
    bar.start(sum(nbytes_of(d, shape) for _, d, shape in all_tensors(g)))
    index = write_checkpoint(out, g, sparse=sparse, progress=bar, values=computing_chunks if computing else None)
    bar.close()
    shards = len(set(index["weight_map"].values()))
    click.echo(f"wrote {out}: {g.num_layers} layers x {g.num_experts} experts, {count(shards, 'shard')}, "
               f"total_size {index['metadata']['total_size']:,}{' (sparse)' if sparse else ''}")


@main.command("synth-saliency")
@click.argument("ckpt")
@click.option("--out", required=True, help="Saliency file to write (an existing file needs --force).")
@click.option("--domain", type=DOMAIN, default="synthetic", show_default=True,
              help="Calibration domain name recorded in the file (what --weight DOMAIN=W refers to).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed of the scores.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@_fail_cleanly
def synth_saliency(ckpt: str, out: str, domain: str, seed: int, force: bool) -> None:
    """Write plausible random saliency for CKPT (for trying the planner without a GPU)."""
    from core.checkpoint import Checkpoint
    from planners.saliency import model_identity
    from rewriter.tools.synth import synthetic_saliency

    refuse_existing_file(out, "--out", force)
    c = Checkpoint.open(ckpt)
    identity = model_identity(c)
    s = synthetic_saliency(identity["num_layers"], identity["num_experts"], identity["top_k"], domain, seed,
                           model=identity)
    # Scores are generated for layers 0..n-1; key them by the checkpoint's MoE layer numbers.
    moe = sorted(c.layout.moe_layers(c))
    s = dataclasses.replace(s, layers={layer: s.layers[i] for i, layer in enumerate(moe)})
    save_saliency(s, out, force)
    click.echo(f"wrote {out}: domain {domain}, {len(s.layers)} layers, family {identity['family']}")
