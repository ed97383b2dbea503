"""Reading ``.pt`` files (backbones, checkpoints) safely: ``torch.load(weights_only=True)``,
so a file holding pickled code never runs it, and one line naming the file when it is not
plain tensors, instead of torch's page of advice."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch


class WeightsFileError(ValueError):
    """A ``.pt`` file that is refused (pickled code) or unreadable (empty, truncated, not
    PyTorch's format); the message names it."""


def load_weights(path: str | Path) -> Any:
    """The tensors (in plain dicts, lists, numbers) saved in ``path``, on the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any global outside its allow-list: code, or objects of ours.
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found is not None:
            raise WeightsFileError(
                f"{path}: refused: it holds pickled code or objects ({found.group(1)}), "
                "not only tensors; it was not run"
            ) from None
        raise WeightsFileError(f"{path}: not a PyTorch weights file (unreadable pickle)") from None
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile, UnicodeDecodeError):
        raise WeightsFileError(
            f"{path}: not a PyTorch weights file (empty, truncated or corrupt)"
        ) from None
