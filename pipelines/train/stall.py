"""A worker's watch on its data: batches that stop coming end the run with a message.

Ray Data never fails a pipeline whose tasks cannot be placed (it logs "may hang forever" to
the job's own log), and a store that stops answering can hold a read task for as long as it
likes. The worker reads its batches in a thread and waits at most ``data.stall_timeout_s``
for each: past that, ``DataStallError`` names the step and the likely causes, and the driver
stops the run (it resumes by name from its last checkpoint).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class DataStallError(RuntimeError):
    """No batch reached a worker within ``data.stall_timeout_s``."""


def within_timeout(batches: Iterable[T], timeout_s: float, step: Callable[[], int]) -> Iterator[T]:
    """``batches``, read one ahead in a thread; ``DataStallError`` when the next one takes
    longer than ``timeout_s``. ``step``: the step waiting for it (for the message)."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not offer(batch):
                    return
        except BaseException as error:  # noqa: BLE001 - re-raised in the training thread
            offer(error)
            return
        offer(_END)

    reader = threading.Thread(target=read, name="darkmatter-batches", daemon=True)
    reader.start()
    try:
        while True:
            try:
                item = ready.get(timeout=timeout_s)
            except queue.Empty:
                raise DataStallError(
                    f"the data stalled: no batch for {timeout_s:g} s at step {step()} "
                    "(data.stall_timeout_s). Ray Data's read or decode tasks are not running: "
                    "the cluster may have no CPU left beside the training workers (see `ray "
                    "status`), or the store stopped answering. The run resumes from its last "
                    "checkpoint when run again with the same name."
                ) from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
