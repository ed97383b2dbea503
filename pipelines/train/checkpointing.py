"""What a training checkpoint holds, written and read with ``weights_only=True``-safe types."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import ray.train
import torch
from torch import nn

STATE_FILE = "state.pt"


@dataclass
class Progress:
    """Where training is: restored with the weights, so a resumed run continues exactly."""

    step: int = 0
    nonfinite_total: int = 0
    images_seen: int = 0
    mlflow_run_id: str = ""
    last_knn_top1: float = -1.0

    @classmethod
    def from_state(cls, state: dict) -> Progress:
        """From a checkpoint's ``progress`` entry; keys this version no longer has (``extra``,
        in checkpoints written before it was removed) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in state.items() if key in known})


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
) -> None:
    """Model (EMA teacher and queues are part of its state_dict), optimiser, schedule, progress, RNG."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "progress": asdict(progress),
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, directory / STATE_FILE)


def load_checkpoint(
    checkpoint: ray.train.Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> Progress:
    """Restore what ``save_checkpoint`` wrote into the given objects; returns its Progress."""
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress.from_state(state["progress"])


@contextmanager
def temporary_checkpoint(
    save: bool,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
) -> Iterator[ray.train.Checkpoint | None]:
    """A checkpoint of the training state in a temporary directory that lives as long as the
    ``with`` block (``ray.train.report`` copies it to storage), or None when not ``save``."""
    if not save:
        yield None
        return
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(Path(directory), model, optimizer, schedule, progress)
        yield ray.train.Checkpoint.from_directory(directory)
