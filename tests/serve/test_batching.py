"""The batcher: jobs of one key share a forward, up to max_batch; others wait their turn; the
cancelled never run; a failing forward fails its own jobs only."""

from __future__ import annotations

import asyncio

from lora_cli.serve.batching import Batcher, Job


def run_jobs(keys, max_batch, cancel=(), fail_key=None, max_wait_s=0.05):
    """Submit one job per key at once; returns (the batches computed, each job's result)."""
    batches, results = [], {}

    def compute(jobs):
        batches.append([j.item for j in jobs])
        if jobs[0].key == fail_key:
            raise RuntimeError("boom")
        return [j.item * 10 for j in jobs]

    async def main():
        batcher = Batcher("g", compute, max_batch=max_batch, max_wait_s=max_wait_s)
        batcher.start()
        done = asyncio.Event()
        jobs = [Job(None, i, key, lambda r, i=i: (results.__setitem__(i, r),
                                                   len(results) == len(keys) - len(cancel) and done.set()))
                for i, key in enumerate(keys)]
        for job in jobs:
            batcher.submit(job)
        for i in cancel:
            jobs[i].cancel()
        await asyncio.wait_for(done.wait(), 30)
        await batcher.close()

    asyncio.run(main())
    return batches, results


def test_same_key_jobs_share_a_forward_up_to_max_batch():
    batches, results = run_jobs(["m"] * 5, max_batch=2)
    assert batches == [[0, 1], [2, 3], [4]]
    assert results == {i: i * 10 for i in range(5)}


def test_keys_never_mix_and_keep_their_order():
    batches, _ = run_jobs(["a", "b", "a", "b", "a"], max_batch=8)
    assert batches == [[0, 2, 4], [1, 3]]


def test_cancelled_jobs_are_dropped_before_their_forward():
    batches, results = run_jobs(["m"] * 4, max_batch=8, cancel=(1, 2))
    assert batches == [[0, 3]]
    assert set(results) == {0, 3}


def test_a_failing_forward_fails_only_its_jobs():
    batches, results = run_jobs(["bad", "ok", "bad"], max_batch=8, fail_key="bad")
    assert isinstance(results[0], RuntimeError) and isinstance(results[2], RuntimeError)
    assert results[1] == 10
