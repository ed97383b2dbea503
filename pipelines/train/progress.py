"""The run's one console view, drawn by the driver for steps that happen on remote workers.

Rank 0 posts its interval metrics and its messages (start, kNN, warnings) to a small named
actor, in order; the driver, while ``trainer.fit()`` runs in a thread, drains it and shows
them: in a terminal, one live tqdm bar (step / total, epoch, loss, lr, img/s, data-wait
share, ETA) with the messages printed above it; elsewhere (CI, logs), a plain line every
``train.log_every`` steps with its ETA, and the messages. Without a board (a worker started
by something else) rank 0 prints its lines itself.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import ray
from tqdm import tqdm

NAMESPACE = "darkmatter-progress"
T = TypeVar("T")


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def post(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events


def board_name(run_name: str) -> str:
    return f"progress:{run_name}"


class ConsoleOut:
    """Rank 0's way to the driver's console: its board, else its own stdout."""

    def __init__(self, run_name: str) -> None:
        try:
            self.board = ray.get_actor(board_name(run_name), namespace=NAMESPACE)
        except ValueError:
            self.board = None

    def say(self, message: str) -> None:
        """One line above the bar (or on its own line)."""
        if self.board is None:
            # Ray Train patches ``print`` to log *and* echo when stdout is wrapped (doubling
            # every line); the process's own stdout is forwarded once.
            print(message, file=sys.__stdout__, flush=True)
        else:
            self.board.post.remote({"message": message})

    def progress(self, line: str, step: int, metrics: dict[str, float]) -> None:
        """An interval's metrics: the bar's state, or ``line`` without a board."""
        if self.board is None:
            self.say(line)
        else:
            self.board.post.remote({"line": line, "step": step, **metrics})


# Rank 0's console (one run per Ray Train worker process), set by ``attach_console``.
_console: ConsoleOut | None = None


def attach_console(run_name: str) -> None:
    """On rank 0: send ``say`` and ``post_progress`` to the driver's view of ``run_name``."""
    global _console
    _console = ConsoleOut(run_name)


def say(message: str) -> None:
    """One line to the run's console (rank 0's messages: start, kNN, warnings)."""
    if _console is None:
        print(message, file=sys.__stdout__, flush=True)
    else:
        _console.say(message)


def post_progress(line: str, step: int, metrics: dict[str, float]) -> None:
    """An interval's metrics (rank 0): the live bar's state, or ``line`` in plain output."""
    if _console is None:
        say(line)
    else:
        _console.progress(line, step, metrics)


def quiet_worker_logs(verbose: bool) -> None:
    """In a worker: Ray Train logs each report of each rank ("Reporting training result ...")
    at INFO from a logger named after its file, outside ``ray.train`` and so outside the
    trainer's ``LoggingConfig``; the root level hides it and other libraries' INFO lines
    (warnings and errors still pass). ``verbose`` leaves Ray's levels as they are."""
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its own handler, at INFO
        # Ray Data's iter_torch_batches hands torch read-only (object store) arrays, which
        # torch warns about once per process; the batches are copied before they are written.
        warnings.filterwarnings(
            "ignore", message="The given NumPy array is not writable", category=UserWarning
        )


def format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class PlainLines:
    """The non-terminal view: each interval's line with its ETA (from the steps the driver saw
    go by since the first interval), and the messages, as they come."""

    def __init__(self, total_steps: int | None, out=None) -> None:
        self.total_steps = total_steps
        self.out = out or sys.stdout
        self.first: tuple[float, int] | None = None

    def show(self, event: dict[str, Any]) -> None:
        if "message" in event:
            print(event["message"], file=self.out, flush=True)
            return
        now, step = time.monotonic(), int(event["step"])
        eta = ""
        if "remaining_s" in event:  # a time budget: what is left of it
            eta = f"  ETA {format_eta(event['remaining_s'])}"
        elif self.first is None:
            self.first = (now, step)
        elif step > self.first[1]:
            per_step = (now - self.first[0]) / (step - self.first[1])
            eta = f"  ETA {format_eta(per_step * (self.total_steps - step))}"
        print(event["line"] + eta, file=self.out, flush=True)

    def close(self) -> None:
        pass


class LiveBar:
    """The terminal view: one tqdm bar; messages are written above it."""

    def __init__(self, total_steps: int | None, initial: int = 0) -> None:
        self.bar = tqdm(
            total=total_steps, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr
        )

    def show(self, event: dict[str, Any]) -> None:
        if "message" in event:
            self.bar.write(event["message"], file=sys.stdout)
            return
        step = min(int(event["step"]), self.bar.total or int(event["step"]))
        left = f"  ETA {format_eta(event['remaining_s'])}" if "remaining_s" in event else ""
        self.bar.set_postfix_str(
            f"ep {event['epoch']:.1f}  loss {event['loss']:.4f}  lr {event['lr']:.3g}  "
            f"{event['img_per_s']:.0f} img/s  wait {100 * event['data_wait_share']:.0f}%{left}",
            refresh=False,
        )
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def console_view(
    total_steps: int | None, start_step: int = 0, terminal: bool | None = None
) -> LiveBar | PlainLines:
    """A live bar from ``start_step`` when ``terminal`` (default: stderr is one), else plain
    lines."""
    terminal = sys.stderr.isatty() if terminal is None else terminal
    return LiveBar(total_steps, start_step) if terminal else PlainLines(total_steps)


def run_with_progress(
    run_name: str,
    total_steps: int | None,
    fit: Callable[[], T],
    start_step: int = 0,
    terminal: bool | None = None,
) -> T:
    """``fit()`` while the run's board is shown (``console_view``). ``total_steps`` None: the
    run is timed (``schedule.max_minutes``) and its events carry ``remaining_s``, the ETA."""
    board = ProgressBoard.options(
        name=board_name(run_name), namespace=NAMESPACE, get_if_exists=True
    ).remote()
    ray.get(board.drain.remote())  # up before rank 0 looks for it; nothing left from before
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    view = console_view(total_steps, start_step, terminal)
    try:
        running = True
        while running:
            thread.join(timeout=0.5)
            running = thread.is_alive()  # then one last drain: rank 0's final lines
            for event in ray.get(board.drain.remote()):
                view.show(event)
    finally:
        view.close()
        ray.kill(board)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
