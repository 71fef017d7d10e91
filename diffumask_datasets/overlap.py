"""Overlap: each batch's CPU tail runs in one background thread while the next batch
generates on the device.

    for samples in overlapped(dm.batches(prompts, classes=...)):
        ...

Iterating the jobs (making the next batch: pipeline, capture, mask cut) stays in the
caller's thread; each job (cleanup, quality, Samples, PNG encoding) runs in the worker.
Results come back in order, so the output is the serial path's, byte for byte.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def overlapped(jobs: Iterable[Callable[[], T]], ahead: int = 1) -> Iterator[T]:
    """Each job's result, in order, the job run in one background thread while the
    caller's iterable makes the next. At most `ahead` jobs are queued or running: a
    bounded queue, so at most ahead + 1 batches are held. A job's exception is raised
    here, at its turn. However the loop ends (exhausted, an error, Ctrl-C, the consumer
    stopping early), queued jobs are cancelled and the running one is waited for."""
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffumask-overlap") as worker:
        try:
            for job in jobs:
                pending.append(worker.submit(job))
                while len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
