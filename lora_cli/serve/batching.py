"""Dynamic batching: requests for runs on one base wait briefly and run as one forward.

One :class:`Batcher` per model in memory (a base and its runs' adapters). Requests become
:class:`Job` s in its queue; its loop takes the oldest job, waits until that job is
``max_wait`` old or ``max_batch`` jobs that can share its forward are waiting (the same
:meth:`~lora_cli.serve.backend.ServedRun.batch_key`: any mixable adapters of the base, or
one run whose method cannot mix), and runs them on the model's own thread. Jobs that cannot
join wait for the next forward, first in, first out by key, and do not wait again for a
batch to fill once they are ``max_wait`` old. While a forward runs, new jobs queue up, so
under load batches fill without waiting at all.

A job whose client went away is dropped before its forward (``cancelled``); one already
generating stops at its next token (:meth:`lora_cli.serve.streams.Row.cancel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One row for a forward: its run, its prepared input, and who to tell when done."""

    run: Any
    item: Any
    key: Hashable
    done: Callable[[Any], None]
    """Called on the event loop with the row's result, or with the exception its forward raised."""
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True
        cancel = getattr(self.item, "cancel", None)
        if cancel is not None:  # a generating row: stops at its next token
            cancel()


class Batcher:
    """Collects jobs for one model and runs them in batches on that model's thread.

    ``compute(jobs) -> results`` runs on the thread, one result (or exception) per job."""

    def __init__(self, name: str, compute: Callable[[list[Job]], list[Any]], max_batch: int, max_wait_s: float,
                 observe: Callable[[str, int, int], None] = lambda group, batch, waiting: None) -> None:
        self.name = name
        self.compute = compute
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.observe = observe
        """``(group, batch size, jobs still waiting)`` after each batch is taken (metrics)."""
        self.pending: deque[Job] = deque()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"loracli-{name}")
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        return len(self.pending)

    def start(self) -> None:
        """Start the loop (on the running event loop)."""
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Stop after the batch in progress (the server drains requests before calling this)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True)

    def submit(self, job: Job) -> None:
        self.pending.append(job)
        assert self._arrived is not None, "Batcher.start() was not called"
        self._arrived.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._arrived is not None
        while True:
            while not self._live_first():
                self._arrived.clear()
                await self._arrived.wait()
            first = self.pending[0]
            while self._count(first.key) < self.max_batch:
                left = first.enqueued + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), left)
            jobs = self._take(first.key)
            self.observe(self.name, len(jobs), len(self.pending))
            try:
                results = await loop.run_in_executor(self.executor, self._compute, jobs)
            except asyncio.CancelledError:
                for job in jobs:
                    job.done(asyncio.CancelledError())
                raise
            for job, result in zip(jobs, results):
                job.done(result)

    def _live_first(self) -> bool:
        while self.pending and self.pending[0].cancelled:
            self.pending.popleft()
        return bool(self.pending)

    def _count(self, key: Hashable) -> int:
        return sum(1 for job in self.pending if job.key == key and not job.cancelled)

    def _take(self, key: Hashable) -> list[Job]:
        taken, kept = [], deque()
        for job in self.pending:
            if job.cancelled:
                continue
            (taken if job.key == key and len(taken) < self.max_batch else kept).append(job)
        self.pending = kept
        return taken

    def _compute(self, jobs: list[Job]) -> list[Any]:
        try:
            return self.compute(jobs)
        except Exception as exc:  # noqa: BLE001 - every job of the batch gets the failure, the server goes on
            logger.error("a batch of %d on %s failed: %s", len(jobs), self.name, type(exc).__name__)
            logger.debug("batch failure", exc_info=True)
            return [exc] * len(jobs)
