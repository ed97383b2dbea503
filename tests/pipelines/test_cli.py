"""The command line answers --help and a refused argument without loading torch or Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipelines.cli import build_parser

HEAVY = ("torch", "torchvision", "ray", "mlflow", "pyarrow")


def modules_loaded_by(argv: list[str]) -> tuple[int, set[str]]:
    """(exit code, heavy modules imported) of ``darkmatter ARGV`` in a fresh interpreter."""
    code = (
        "import json, sys\n"
        "from pipelines.cli import main\n"
        "try:\n"
        f"    rc = main({argv!r})\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        f"print(json.dumps([rc, [m for m in {HEAVY!r} if m in sys.modules]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    rc, loaded = json.loads(out.strip().splitlines()[-1])
    return rc, set(loaded)


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["pretrain", "--help"], ["eval", "--help"], ["tune", "--help"], ["index"]],
)
def test_help_and_usage_errors_import_nothing_heavy(argv):
    rc, loaded = modules_loaded_by(argv)
    assert rc in (0, 2)
    assert not loaded, f"darkmatter {' '.join(argv)} imported {sorted(loaded)}"


def test_a_refused_config_answers_before_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: {path: x}}\ntrain: {batch_size: -1}\n")
    rc, loaded = modules_loaded_by(["pretrain", "--config", str(bad)])
    assert rc == 2
    assert not loaded & {"ray", "mlflow", "pyarrow"}  # the config's methods need torch


def test_every_command_names_an_importable_handler():
    import importlib

    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse internals
    targets = []
    for name, sub in subparsers.items():
        if name == "jobs":
            targets += [
                a.get_default("func").target
                for a in sub._subparsers._group_actions[0].choices.values()
            ]  # noqa: SLF001
        else:
            targets.append(getattr(sub.get_default("func"), "target", None))
    for target in filter(None, targets):  # None: a handler in pipelines.cli itself (pretrain)
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "--config", "c.yaml"],
        ["eval", "random", "--train", "a", "--test", "b"],
        ["embed", "random", "--data", "a", "--out", "b"],
        ["inspect", "a"],
        ["index", "a", "--out", "b"],
        ["tune", "--space", "s.yaml"],
    ],
    ids=lambda argv: argv[0],
)
def test_every_command_on_ray_takes_verbose_and_address(argv):
    quiet = build_parser().parse_args(argv)
    assert quiet.verbose is False and quiet.address is None
    loud = build_parser().parse_args([*argv, "--verbose", "--address", "10.0.0.1:6379"])
    assert loud.verbose is True and loud.address == "10.0.0.1:6379"
