"""A progress bar in the user's terminal for a run whose steps happen on remote workers.

Rank 0 posts its step to a small named actor; the driver, while ``trainer.fit()`` runs
in a thread, polls it and draws a tqdm bar. Without a terminal nothing is drawn (the
workers' one-line log per interval is the record).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import ray
from tqdm import tqdm

NAMESPACE = "darkmatter-progress"
T = TypeVar("T")


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.state: dict[str, Any] = {"step": 0}

    def post(self, state: dict[str, Any]) -> None:
        self.state = state

    def read(self) -> dict[str, Any]:
        return self.state


def board_name(run_name: str) -> str:
    return f"progress:{run_name}"


def post_progress(run_name: str, **state: Any) -> None:
    """From rank 0: fire-and-forget; a missing board (no terminal) is fine."""
    try:
        ray.get_actor(board_name(run_name), namespace=NAMESPACE).post.remote(state)
    except ValueError:
        pass


def run_with_progress_bar(run_name: str, total_steps: int, fit: Callable[[], T]) -> T:
    """``fit()`` with a tqdm bar of the run's steps when stderr is a terminal."""
    if not sys.stderr.isatty():
        return fit()
    board = ProgressBoard.options(
        name=board_name(run_name), namespace=NAMESPACE, get_if_exists=True
    ).remote()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    with tqdm(total=total_steps, unit="step", dynamic_ncols=True) as bar:
        while thread.is_alive():
            thread.join(timeout=1.0)
            state = ray.get(board.read.remote())
            bar.n = min(int(state.get("step", 0)), total_steps)
            if "loss" in state:
                bar.set_postfix(loss=f"{state['loss']:.4f}", refresh=False)
            bar.refresh()
    ray.kill(board)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
