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

from pipelines.ingest.position import DataPosition
from pipelines.train.record import RECORD, RECORD_COPY, RecordUnreadable, restore_record
from pipelines.weights import load_weights

STATE_FILE = "state.pt"
# The data position (`pipelines.ingest.position`), apart from the weights: the driver reads
# it (to plan what is left of the epoch) without loading the model.
POSITION_FILE = "data_position.pt"


@dataclass
class Progress:
    """Where training is: restored with the weights, so a resumed run continues exactly."""

    step: int = 0
    nonfinite_total: int = 0
    images_seen: int = 0
    mlflow_run_id: str = ""
    last_knn_top1: float = -1.0
    train_seconds: float = 0.0  # training time spent (schedule.max_minutes counts it)
    lr_scale: float = 1.0  # the learning rate's factor after non-finite restarts

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
    position: DataPosition | None = None,
) -> None:
    """Model (EMA teacher and queues are part of its state_dict), optimiser, schedule, progress,
    RNG; and the data position, in its own file."""
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
    if position is not None:
        torch.save(position.to_state(), directory / POSITION_FILE)


def load_position(directory: str | Path) -> DataPosition:
    """The data position saved in a checkpoint directory (empty if it has none)."""
    path = Path(directory) / POSITION_FILE
    if not path.exists():
        return DataPosition()
    return DataPosition.from_state(load_weights(path))


def latest_position(storage_path: str, run_name: str) -> tuple[int, DataPosition]:
    """(step, data position) of the checkpoint a rerun of ``run_name`` resumes from (Ray
    Train's latest committed one); (0, empty) when there is none."""
    run_dir = f"{storage_path.rstrip('/')}/{run_name}"
    try:
        result = ray.train.Result.from_path(run_dir)
    except RuntimeError:  # no run folder or no checkpoint snapshot yet
        return 0, DataPosition()
    except Exception as error:  # noqa: BLE001 - Ray Train's record does not read (a full disk)
        if not restore_record(run_dir):
            raise RecordUnreadable(
                f"Ray Train's record of the committed checkpoints, {run_dir}/{RECORD}, does "
                f"not read ({error}) and its last good copy ({RECORD_COPY}) cannot be put "
                "back: free space in checkpoint.storage_path and run the same command again; "
                "without that copy no checkpoint was committed: delete the record to start "
                "the run afresh"
            ) from None
        result = ray.train.Result.from_path(run_dir)
    if result.checkpoint is None:
        return 0, DataPosition()
    with result.checkpoint.as_directory() as directory:
        step = int((result.metrics or {}).get("step", 0))
        return step, load_position(directory)


def load_checkpoint(
    checkpoint: ray.train.Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[Progress, DataPosition]:
    """Restore what ``save_checkpoint`` wrote into the given objects; returns its Progress and
    data position."""
    with checkpoint.as_directory() as directory:
        state = load_weights(Path(directory) / STATE_FILE)
        position = load_position(directory)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress.from_state(state["progress"]), position


@contextmanager
def temporary_checkpoint(
    save: bool,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    position: DataPosition | None = None,
) -> Iterator[ray.train.Checkpoint | None]:
    """A checkpoint of the training state in a temporary directory that lives as long as the
    ``with`` block (``ray.train.report`` copies it to storage), or None when not ``save``."""
    if not save:
        yield None
        return
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(Path(directory), model, optimizer, schedule, progress, position)
        yield ray.train.Checkpoint.from_directory(directory)
