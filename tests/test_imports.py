"""The core rewrite path needs neither torch nor ray."""

from __future__ import annotations

import subprocess
import sys


def test_core_modules_import_without_torch_or_ray():
    code = (
        "import sys\n"
        "import rewriter, rewriter.cli, rewriter.exec.run.executor, rewriter.exec.publish.verify, rewriter.exec.run.dryrun, rewriter.tools.inspect\n"
        "import planners.plan, planners.policies, planners.cost, planners.saliency, rewriter.tools.synth\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules)\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_help_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "rewriter.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("synth", "inspect", "plan", "run", "prune", "soft-prune", "verify", "dry-run", "profile",
                "eval", "import-reap", "synth-saliency"):
        assert f"  {cmd}" in r.stdout, cmd
