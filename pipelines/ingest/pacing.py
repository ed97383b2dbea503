"""A floor under the period of Ray Data's scheduling loop, so that an idle loop sleeps.

Ray Data's ``StreamingExecutor`` runs its scheduling loop in a thread of the process
that executes the dataset (for a trainer's dataset, the ``SplitCoordinator`` actor). Each
step blocks in ``ray.wait(timeout=0.1)`` only while some operator has a task running; when
none has (the pipeline is held back by its object-store budget, waiting for the trainers
to consume), nothing blocks and the loop spins: measured on 2 CPUs during
``darkmatter pretrain``, the ``SplitCoordinator`` used 0.52 of a core while the two
trainers used 0.48 and 0.46 (docs/PERFORMANCE.md, "Ray Data's idle scheduling loop").
Upstream knows the loop's cost (ray-project/ray#63544, #62040); Ray 2.60 has no setting
for it, but it calls every registered ``ExecutionCallback`` once per step.

``PacedSchedulingLoop`` is such a callback: a step that comes less than ``MIN_STEP_S``
after the previous one sleeps for the rest. A step that waited in ``ray.wait`` already
took longer and is not delayed; a busy loop is held to ``1 / MIN_STEP_S`` steps a
second, which is far more than decode tasks of thousands of rows each need.
"""

from __future__ import annotations

import os
import time

import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback

# 50 ms: at most 20 scheduling steps a second; a task completion waits at most this long
# beyond Ray's own ray.wait before its output moves on.
MIN_STEP_S = 0.05


class PacedSchedulingLoop(ExecutionCallback):
    """Sleeps at the end of a scheduling step that took less than ``MIN_STEP_S``."""

    def __init__(self) -> None:
        self.last_step = time.perf_counter()

    def on_execution_step(self, executor) -> None:  # noqa: ANN001 - Ray's StreamingExecutor
        now = time.perf_counter()
        idle = MIN_STEP_S - (now - self.last_step)
        if idle > 0:
            time.sleep(idle)
        self.last_step = time.perf_counter()


# Set to 0 to run Ray Data's loop unpaced (the side-by-side measurement in PERFORMANCE.md).
PACING_ENV = "DARKMATTER_PACE_RAY_DATA"


def pace_scheduling_loops() -> None:
    """Register ``PacedSchedulingLoop`` in the current ``DataContext`` (once): datasets made
    after this carry it to wherever they execute (the context travels with them)."""
    if os.environ.get(PACING_ENV, "1") == "0":
        return
    context = ray.data.DataContext.get_current()
    if PacedSchedulingLoop not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(PacedSchedulingLoop)
