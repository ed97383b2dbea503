"""The floor under Ray Data's scheduling-loop period (pipelines/ingest/pacing.py)."""

from __future__ import annotations

import time

import ray.data

from pipelines.ingest.pacing import MIN_STEP_S, PacedSchedulingLoop, pace_scheduling_loops


def test_a_fast_step_sleeps_to_the_floor_and_a_slow_one_does_not():
    pacer = PacedSchedulingLoop()
    start = time.perf_counter()
    for _ in range(20):  # an idle loop: steps that take no time
        pacer.on_execution_step(None)
    assert time.perf_counter() - start >= 19 * MIN_STEP_S
    time.sleep(3 * MIN_STEP_S)  # a step that waited in ray.wait
    start = time.perf_counter()
    pacer.on_execution_step(None)
    assert time.perf_counter() - start < MIN_STEP_S


def test_datasets_made_after_pacing_execute_with_it(ray_session):
    pace_scheduling_loops()
    pace_scheduling_loops()  # once, however often it is called
    context = ray.data.DataContext.get_current()
    assert context.custom_execution_callback_classes.count(PacedSchedulingLoop) == 1
    dataset = ray.data.range(100).map_batches(lambda b: b, batch_size=10)
    assert PacedSchedulingLoop in dataset.context.execution_callback_classes
    assert dataset.sum("id") == 4950
