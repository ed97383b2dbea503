"""Every command against the mistakes a user makes: exit status 2, one line naming the input
and what is wrong, never a traceback, and no Ray started (the checks come first)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "cifar10-sample"
DEMO = str(REPO / "configs" / "demo.yaml")
SPACE = str(REPO / "tune_spaces" / "simclr.yaml")
NO_RUN = "0123456789abcdef0123456789abcdef"  # a well-formed MLflow run id of no run
UNREACHABLE = "127.0.0.1:9"  # the discard port: nothing listens there
RANDOM_32 = ("random", "--backbone", "resnet18", "--image-size", "32")


class PickledCode:
    """What a hostile checkpoint holds: unpickling it runs a shell command (touch ``proof``)."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty").mkdir()
    torch.save({"weight": torch.zeros(4)}, tmp / "good.pt")
    whole = (tmp / "good.pt").read_bytes()
    (tmp / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (tmp / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    torch.save({"weight": torch.zeros(4), "hook": PickledCode(tmp / "pwned")}, tmp / "code.pt")
    return {
        "EMPTY": str(tmp / "empty"),
        "TRUNCATED": str(tmp / "truncated.pt"),
        "GARBAGE": str(tmp / "garbage.pt"),
        "CODE": str(tmp / "code.pt"),
        "OUT": str(tmp / "out"),
        "DB": f"sqlite:///{tmp / 'mlflow.db'}",
        "SAMPLE": str(SAMPLE / "test.parquet"),
        "PROOF": str(tmp / "pwned"),
    }


# (argv, what the message must name); upper-case words are the fixture's inputs.
CASES = {
    "inspect-missing-path": (["inspect", "/nonexistent/corpus"], "/nonexistent/corpus"),
    "inspect-empty-folder": (["inspect", "EMPTY"], "EMPTY"),
    "inspect-unreachable-address": (["inspect", "SAMPLE", "--address", UNREACHABLE], UNREACHABLE),
    "index-missing-path": (["index", "/nonexistent/corpus", "--out", "OUT"], "/nonexistent/corpus"),
    "index-empty-folder": (["index", "EMPTY", "--out", "OUT"], "EMPTY"),
    "pretrain-missing-config": (["pretrain", "--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    "pretrain-unknown-set-key": (["pretrain", "--config", DEMO, "--set", "train.bogus=1"], "bogus"),
    "pretrain-bad-set-value": (
        ["pretrain", "--config", DEMO, "--set", "train.batch_size=many"],
        "batch_size",
    ),
    "pretrain-set-without-value": (
        ["pretrain", "--config", DEMO, "--set", "train.batch_size"],
        "train.batch_size",
    ),
    "pretrain-missing-data": (
        ["pretrain", "--config", DEMO, "--set", "data.train.path=/nonexistent/train"],
        "/nonexistent/train",
    ),
    "pretrain-unreachable-address": (
        ["pretrain", "--config", DEMO, "--address", UNREACHABLE],
        UNREACHABLE,
    ),
    "eval-missing-checkpoint": (
        ["eval", "/nonexistent/backbone.pt", "--train", "SAMPLE", "--test", "SAMPLE"],
        "/nonexistent/backbone.pt",
    ),
    "eval-checkpoint-folder": (["eval", "EMPTY", "--train", "SAMPLE", "--test", "SAMPLE"], "EMPTY"),
    "eval-garbage-pt": (["eval", "GARBAGE", "--train", "SAMPLE", "--test", "SAMPLE"], "GARBAGE"),
    "eval-truncated-pt": (
        ["eval", "TRUNCATED", "--train", "SAMPLE", "--test", "SAMPLE"],
        "TRUNCATED",
    ),
    "eval-pickled-code": (["eval", "CODE", "--train", "SAMPLE", "--test", "SAMPLE"], "CODE"),
    "eval-wrong-run-id": (
        ["eval", NO_RUN, "--tracking-uri", "DB", "--train", "SAMPLE", "--test", "SAMPLE"],
        NO_RUN,
    ),
    "eval-missing-train": (
        ["eval", *RANDOM_32, "--train", "/nonexistent/train", "--test", "SAMPLE"],
        "/nonexistent/train",
    ),
    "eval-unreachable-address": (
        ["eval", *RANDOM_32, "--train", "SAMPLE", "--test", "SAMPLE", "--address", UNREACHABLE],
        UNREACHABLE,
    ),
    "embed-garbage-pt": (["embed", "GARBAGE", "--data", "SAMPLE", "--out", "OUT"], "GARBAGE"),
    "embed-missing-data": (
        ["embed", *RANDOM_32, "--data", "/nonexistent/corpus", "--out", "OUT"],
        "/nonexistent/corpus",
    ),
    "tune-missing-space": (
        ["tune", "--space", "/nonexistent/space.yaml"],
        "/nonexistent/space.yaml",
    ),
    "tune-bad-set": (["tune", "--space", SPACE, "--set", "train.batch_size=many"], "batch_size"),
    "tune-unreachable-address": (["tune", "--space", SPACE, "--address", UNREACHABLE], UNREACHABLE),
    "jobs-unreachable-address": (
        ["jobs", "list", "--address", f"http://{UNREACHABLE}"],
        UNREACHABLE,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_user_mistake_gets_one_line_and_status_2(case, inputs, capsys):
    import ray

    argv, named = CASES[case]
    argv = [inputs.get(word, word) for word in argv]
    ray_before = ray.is_initialized()
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own refusals
        status = exit.code
    err = capsys.readouterr().err
    assert ray.is_initialized() == ray_before, "Ray started before the input was checked"
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert inputs.get(named, named) in lines[0], err


def test_a_backbone_holding_pickled_code_is_refused_and_never_run(inputs, capsys):
    argv = ["eval", inputs["CODE"], "--train", inputs["SAMPLE"], "--test", inputs["SAMPLE"]]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert inputs["CODE"] in line and "refused" in line and "posix.system" in line, line
    assert "file an issue" not in line and "WeightsUnpickler" not in line
    assert not Path(inputs["PROOF"]).exists()  # the command in the file did not run
