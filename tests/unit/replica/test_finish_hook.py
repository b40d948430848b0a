"""What a traced sequence reports as it finishes (GenRequest.on_finish, replica/tracing.py's
source): its Completion once, with when a batch took it and the size of that batch, for the
continuous batcher and the request-level ones alike."""

from __future__ import annotations

import asyncio
from functools import partial

from replica.batching import ContinuousBatcher, DynamicBatcher, QueueKnobs
from replica.batching.clock import FakeClock
from replica.batching.testing import CountingEngine, InlineExecutor
from replica.engines.base import generate_batch
from replica.generation import Completion, GenRequest


def traced(max_tokens: int, finished: list[Completion]) -> GenRequest:
    return GenRequest((1, 2, 3), max_tokens, context_len=4096, on_finish=finished.append)


async def test_each_continuous_sequence_reports_once_with_the_batch_it_joined() -> None:
    batcher = ContinuousBatcher(
        CountingEngine(),
        executor=InlineExecutor(),
        max_num_seqs=4,
        max_batch_tokens=64,
        knobs=QueueKnobs(),
        clock=FakeClock(),
    )
    finished: list[Completion] = []
    results = await asyncio.gather(*(batcher.submit(traced(n, finished)) for n in (2, 3, 4)))
    await batcher.close()
    assert sorted(len(c.token_ids) for c in finished) == [2, 3, 4]  # each once
    assert {c.token_ids for c in finished} == {c.token_ids for c in results}
    assert sorted(c.batch_size for c in finished) == [1, 2, 3]  # joined one after another
    for c in finished:
        assert c.started_at_s <= c.first_token_at_s <= c.finished_at_s


async def test_a_request_level_batch_tells_each_sequence_its_size() -> None:
    batcher: DynamicBatcher[GenRequest, Completion] = DynamicBatcher(
        partial(generate_batch, CountingEngine()),
        max_batch_size=8,
        max_wait_s=0.0,
        executor=InlineExecutor(),
        clock=FakeClock(),
    )
    finished: list[Completion] = []
    requests = [traced(2, finished) for _ in range(3)]
    submitted = [asyncio.create_task(batcher.submit(r)) for r in requests]
    await asyncio.gather(*submitted)
    await batcher.close()
    assert [c.batch_size for c in finished] == [3, 3, 3]
