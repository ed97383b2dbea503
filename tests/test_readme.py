"""Every command of the README's command block, run as written from a fresh copy of the
repository on the committed sample (only shortened: fewer steps, fewer trials).

The commands run in the README's order (eval and embed read the backbone that pretrain
wrote), each in its own process with the embedded default (a local Ray started in-process
and a local MLflow store), as a new user runs them. The cluster block is checked against
the CLI's parser here; test_jobs runs submit and jobs against a real token cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
NOT_COPIED = shutil.ignore_patterns(
    ".venv", ".git", "runs", "mlruns", "mlflow.db", "embeddings", "eval.json", "__pycache__",
    ".pytest_cache", ".ruff_cache", "*.egg-info", "manifests",
)  # fmt: skip
SHORTER_RUN = ["--set", "schedule.steps=6", "--set", "optim.warmup_steps=1"]
# A trial's batch is swept up to 512 (3 steps an epoch on the sample): kNN only at its end.
SHORTER_TRIAL = ["--set", "schedule.steps=4", "--set", "optim.warmup_steps=1"]
SHORTER_TRIAL += ["--set", "data.knn_every_epochs=1000"]


def readme_blocks() -> list[list[str]]:
    """The commands of each ```bash block under "## Commands", continuations joined and
    comments dropped."""
    section = README.read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        joined = body.replace("\\\n", " ")
        lines = [line.split("  #", 1)[0].strip() for line in joined.splitlines()]
        blocks.append([line for line in lines if line])
    return blocks


LOCAL_COMMANDS, CLUSTER_COMMANDS = readme_blocks()


def shortened(command: str) -> list[str]:
    """The README line as argv, with only the overrides that make it short."""
    argv = shlex.split(command)
    assert argv[0] == "darkmatter", command
    if argv[1] == "pretrain":
        return argv + SHORTER_RUN
    if argv[1] == "tune":
        argv[argv.index("--trials") + 1] = "1"  # many trials: tests/pipelines/tune
        return argv + SHORTER_TRIAL
    if argv[1] in ("inspect", "index", "eval", "embed"):
        return argv
    raise AssertionError(f"README command {command!r}: say here how the test shortens it")


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Path:
    """The repository as a clone has it: no runs, no stores, no embeddings."""
    copy = tmp_path_factory.mktemp("readme") / "darkmatter"
    shutil.copytree(REPO, copy, ignore=NOT_COPIED)
    return copy


def run_as_written(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    executable = Path(sys.executable).parent / "darkmatter"
    return subprocess.run(
        [str(executable), *argv[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.parametrize("command", LOCAL_COMMANDS)
def test_readme_command_runs_as_written(command: str, fresh_copy: Path):
    result = run_as_written(shortened(command), fresh_copy)
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, f"{command}\n{output}"
    subcommand = command.split()[1]
    if subcommand == "inspect":
        report = json.loads(result.stdout)
        assert report["decoded"] == 3000 and report["skipped"] == 0, report
    elif subcommand == "index":
        marker = json.loads(
            (fresh_copy / "manifests/cifar10-sample/_darkmatter_manifest.json").read_text()
        )
        assert marker["format"] == "parquet" and marker["rows"] == 3000, marker
    elif subcommand == "pretrain":
        assert (fresh_copy / "runs/simclr-cifar10/darkmatter/backbone.pt").is_file()
        assert "kNN top-1 accuracy" in result.stdout
    elif subcommand == "eval":
        results = json.loads((fresh_copy / "eval.json").read_text())
        assert 0.1 < results["knn_top1"] <= 1.0, results
    elif subcommand == "embed":
        assert list((fresh_copy / "embeddings").glob("*.parquet"))
    elif subcommand == "tune":
        assert "trial" in result.stdout and "best config" in result.stdout, output
        # The trial really trained: it has its own finished run directory.
        trials = fresh_copy / "runs" / "sweeps" / "simclr-sweep-trials"
        assert len([p for p in trials.iterdir() if p.is_dir()]) == 1


@pytest.mark.parametrize("command", CLUSTER_COMMANDS)
def test_readme_cluster_command_parses(command: str):
    argv = shlex.split(command.replace(" ID", " raysubmit_123"))
    args = build_parser().parse_args(argv[1:])
    assert callable(args.func)


def test_readme_blocks_are_found():
    assert [c.split()[1] for c in LOCAL_COMMANDS] == [
        "inspect",
        "index",
        "pretrain",
        "eval",
        "embed",
        "tune",
    ]
    assert len(CLUSTER_COMMANDS) >= 4
