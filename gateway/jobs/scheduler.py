"""The job scheduler: one task that sends queued jobs to replicas.

Without flow control, only into idle capacity: a job is dispatched only while no real-time
request waits at the gateway (admission queue empty) and to a replica whose outstanding count
is below `jobs.max_outstanding_per_replica`; the routing policy chooses among those. Under flow
control (`flow_control:`), jobs wait in the gateway queue itself, in a durable class below
every configured one (never shed, no TTL), so a free slot goes to a job only when no real-time
request may use it; `jobs.max_outstanding_per_replica` stays their cap per replica, and at most
that many per replica in rotation wait in the queue at once (the rest stay in the store).

Each dispatch is an admission lease taken when the job is started (so real-time routing sees
job traffic in the outstanding counts) and closed when its task ends, however it ends: done,
failed, cancelled, even before its first step. The scheduler polls for capacity every
`jobs.poll_interval_s` only while jobs wait; a submit or a finished job wakes it at once.
With jobs off none of this runs: the real-time path is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.aio import wait_set
from gateway.config import Jobs, Timeouts
from gateway.control.fetch import BodyOverLimit, Session, read_capped
from gateway.datapath.classify import classify
from gateway.datapath.upstream import RETRIABLE_STATUSES, client_timeout, upstream_url
from gateway.errors import GatewayError, NoHealthyReplica, error_body
from gateway.flow.queue import DEFAULT_TICKET
from gateway.jobs.model import Job, Outcome
from gateway.jobs.store import Store, StoreUnavailable
from gateway.ops.metrics import GatewayMetrics
from gateway.pool.lease import Lease
from gateway.pool.live import Live
from gateway.routing.replica import Replica

NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())

log = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # no job queued: a submit wakes the scheduler; this is only a safety net
DEFER_S = 1.0  # a job no replica of its model can take now is passed over this long
MAX_DEFERRED = 1000  # jobs passed over at once; past that, the oldest waits at the head
MAX_PASSES = 16  # jobs passed over in a row before the scheduler pauses (DEFER_S / 4)
MAX_REPLY_BYTES = 16 * 1024 * 1024  # a job's stored result; a larger reply fails the job
# A replica's answer a job may keep; any other status (000, 099, a final 1xx, 600) is a bad
# gateway answer, an upstream failure of the attempt, as the proxy makes it a 502.
FINAL_STATUSES = range(200, 600)
STORE_RETRY_S = 1.0  # the store could not be reached: claims resume after this long
FULL_S = 0.1  # a replica whose job slots other gateways' jobs filled is passed over this long


def eligible(state: Live, settings: Jobs) -> Sequence[Replica]:
    """Replicas with spare capacity for a job now (their load as best known: this gateway's
    requests there, plus others' from a fresh load report); none while real-time requests
    wait, or before the replicas' model lists are in."""
    if state.admission.queued_everywhere() or state.draining or not state.models_polled:
        return ()
    limits = state.runtime.config.limits
    if (
        limits.max_outstanding is not None
        and state.pool.outstanding_everywhere() >= limits.max_outstanding
    ):
        return ()
    now, max_age = state.pool.now(), state.runtime.config.load_feedback.max_age_s
    return [r for r in state.pool.available() if r.load(now, max_age) < slots(state, settings, r)]


def slots(state: Live, settings: Jobs, replica: Replica) -> int:
    """How many requests `replica` may hold for a job to be sent there: the jobs threshold,
    within the gateway's and the replica's own slot limits."""
    threshold = settings.max_outstanding_per_replica
    per_replica = state.runtime.config.limits.max_outstanding_per_replica
    if per_replica is not None:
        threshold = min(threshold, per_replica)
    return min(threshold, replica.max_concurrency or threshold)


@dataclass(frozen=True)
class Reply:
    """What one attempt got: the replica's answer (status_code set) or why there is none."""

    status_code: int | None
    text: str
    final: bool = False  # no other attempt would do better (a reply too large to store)

    @property
    def retriable(self) -> bool:
        if self.final:
            return False
        return self.status_code is None or self.status_code in RETRIABLE_STATUSES

    @property
    def code(self) -> int:
        """The status the lease records: 502 when the replica gave no usable answer."""
        return self.status_code or 502


def _refusal(error: GatewayError) -> Reply:
    """The answer a client would get for the job's request, kept as its final reply."""
    return Reply(error.status, json.dumps(error_body(error.error_type, str(error))), True)


def outcome_of(reply: Reply, job: Job, max_attempts: int) -> Outcome | None:
    """The job's final outcome, or None when it should go back to the queue for a retry."""
    if reply.retriable and job.attempt < max_attempts:
        return None
    if reply.status_code is None:
        message = f"{reply.text} (attempt {job.attempt} of {max_attempts})"
        return Outcome("failed", error_code="upstream_error", error_message=message)
    if reply.status_code < 400:
        return Outcome("succeeded", status_code=reply.status_code, response=reply.text)
    return Outcome("failed", status_code=reply.status_code, response=reply.text)


class Scheduler:
    def __init__(
        self,
        state: Live,
        store: Store,
        settings: Jobs,
        metrics: GatewayMetrics,
        session: Session,
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._session = session
        self._store = store
        self._settings = settings
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._held: Job | None = None  # claimed, waiting for a slot that vanished meanwhile
        self._deferred: dict[str, float] = {}  # job id -> until when claims pass it over
        self._passed = 0  # jobs passed over in a row
        self._full: dict[str, float] = {}  # replica url -> until when (the store said full)
        self._waiting = 0  # flow control: jobs waiting in the gateway queue
        self._jobs_at: Counter[str] = Counter()  # flow control: jobs in flight per replica
        # Jobs whose dispatch is recording its outcome: the store fences that write, and a
        # renewal racing it (the job just finished, so no longer ours) must not cut it short.
        self._recording: set[str] = set()

    def _deferred_ids(self) -> list[str]:
        now = time.monotonic()
        for job_id in [j for j, until in self._deferred.items() if until <= now]:
            del self._deferred[job_id]
        return list(self._deferred)

    def _defer(self, job_id: str) -> None:
        if len(self._deferred) < MAX_DEFERRED:
            self._deferred[job_id] = time.monotonic() + DEFER_S

    def wake(self) -> None:
        self._wake.set()

    def abandon(self, job_ids: Sequence[str]) -> None:
        """Stop dispatches of cancelled jobs (their result is already recorded as cancelled)."""
        for job_id in job_ids:
            if self._held is not None and self._held.id == job_id:
                self._held = None
            task = self._in_flight.get(job_id)
            if task is not None:
                task.cancel()

    def holding(self) -> dict[str, asyncio.Task[None] | Job]:
        """The jobs this gateway is dispatching (their tasks) or holds claimed for a slot."""
        holding: dict[str, asyncio.Task[None] | Job] = dict(self._in_flight)
        if self._held is not None:
            holding[self._held.id] = self._held
        return holding

    def keep_only(self, asked: dict[str, asyncio.Task[None] | Job], still: set[str]) -> None:
        """Of the jobs `asked` about, those the store no longer counts as ours (cancelled
        elsewhere, or taken over after our lease ran out) stop here: the very dispatch or claim
        asked about, not a newer one of the same job begun meanwhile."""
        for job_id, what in asked.items():
            if job_id in still or job_id in self._recording:
                continue
            if isinstance(what, Job):
                if self._held is what:
                    self._held = None
            else:
                what.cancel()

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._loop()
                except StoreUnavailable as exc:
                    log.warning("jobs: scheduler paused: %s", exc)
                    await self._sleep(STORE_RETRY_S)
        finally:
            tasks = list(self._in_flight.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _eligible(self) -> Sequence[Replica]:
        """`eligible`, but for replicas the store found full a moment ago."""
        now = time.monotonic()
        return [r for r in eligible(self._state, self._settings) if self._full.get(r.url, 0) <= now]

    async def _loop(self) -> None:
        while True:
            if self._state.admission.rules.flow is not None:
                await self._queue_jobs()
                continue
            replicas = self._eligible()
            if not replicas:
                await self._sleep(self._settings.poll_interval_s)
            elif self._held is None:
                self._held = await self._store.claim(self._deferred_ids())
                if self._held is None:
                    await self._sleep(IDLE_WAIT_S if not self._deferred else DEFER_S)
            else:
                # One loop turn first: a real-time request that a release just woke in the
                # admission queue takes its slot before a job can.
                await asyncio.sleep(0)
                replicas = self._eligible()
                job = self._held
                if replicas and job is not None and not self._start(job, replicas):
                    # No replica of its model can take it now: back to the queue, passed
                    # over for DEFER_S, so other models' jobs go meanwhile.
                    self._held = None
                    if await self._store.unclaim(job):
                        self._defer(job.id)
                    self._passed += 1
                    if self._passed >= MAX_PASSES:  # a queue of such jobs: pace the store
                        self._passed = 0
                        await self._sleep(DEFER_S / 4)
                elif replicas and job is not None:
                    self._held, self._passed = None, 0

    async def _queue_jobs(self) -> None:
        """Under flow control: claim jobs while fewer than the cap per replica in rotation wait
        in the gateway queue, each in a task that waits for its slot there."""
        state, settings = self._state, self._settings
        room = settings.max_outstanding_per_replica * len(state.pool.available())
        if state.draining or not state.models_polled or self._waiting >= room:
            await self._sleep(self._settings.poll_interval_s)
            return
        job = await self._store.claim(self._deferred_ids())
        if job is None:
            await self._sleep(IDLE_WAIT_S if not self._deferred else DEFER_S)
            return
        self._waiting += 1  # until it has its slot (or ends without one)
        task = asyncio.create_task(self._queued(job), name=f"job-{job.id}")
        self._in_flight[job.id] = task
        task.add_done_callback(lambda t: self._done(job.id, t))

    async def _queued(self, job: Job) -> None:
        """One claimed job: its slot from the gateway queue (or, run again after a crash, the
        replica that had it), then its dispatch. It counts as waiting until it has a slot."""
        waiting = [True]

        def got_slot() -> None:
            if waiting[0]:
                waiting[0] = False
                self._waiting -= 1

        try:
            await self._take_slot(job, got_slot)
        finally:
            got_slot()

    async def _take_slot(self, job: Job, got_slot: Callable[[], None]) -> None:
        state = self._state
        try:  # classified as a real-time request with its body would be
            sent = classify(state, job.url, NO_HEADERS, job.body.encode())
        except NoHealthyReplica:  # its model's replicas are out of rotation: later
            if await self._store.unclaim(job):
                self._defer(job.id)
            return
        except GatewayError as exc:  # a model no replica serves: the answer a client gets
            await self._record(job, _refusal(exc))
            return
        again = self._previous(job, state.pool.available_for(sent.model))
        if again is not None:
            got_slot()
            lease = state.admission.take([again], sent.info)
            with contextlib.closing(lease):
                await self._dispatch(job, lease, sent.body, sent.path_qs, None)
            return
        admission, cap = state.admission, self._settings.max_outstanding_per_replica
        ticket = admission.job_ticket(job.owner or "jobs") or DEFAULT_TICKET
        excluded = self._at_cap(cap)
        async with admission.lease(sent.info, ticket=ticket, excluded=excluded) as lease:
            got_slot()
            lease.key = job.owner
            self._jobs_at[lease.replica.url] += 1
            try:
                await self._dispatch(job, lease, sent.body, sent.path_qs, cap)
            finally:
                self._jobs_at[lease.replica.url] -= 1
                admission.wake()  # a job waiting for this replica's job slot may go now

    def _at_cap(self, cap: int) -> Callable[[Replica], bool]:
        """Replicas where this gateway has `cap` jobs in flight: no more jobs there."""
        return lambda replica: self._jobs_at[replica.url] >= cap

    async def _record(self, job: Job, reply: Reply) -> None:
        """A refused job's outcome (its lease runs out and a gateway refuses it again if the
        store cannot take it now)."""
        outcome = outcome_of(reply, job, self._settings.max_attempts)
        try:
            if outcome is not None and await self._store.finish(job, outcome):
                self._metrics.jobs_finished.labels(outcome.status).inc()
        except StoreUnavailable as exc:  # its lease runs out and a gateway refuses it again
            log.warning("job %s: refusal not recorded: %s", job.id, exc)

    async def _sleep(self, timeout_s: float) -> None:
        await wait_set(self._wake, timeout_s)
        self._wake.clear()

    def _start(self, job: Job, replicas: Sequence[Replica]) -> bool:
        """Route the job as a real-time request with its body would be, and count it; False
        while no eligible replica serves its model (it stays held)."""
        try:  # classified as a real-time request with its body would be
            sent = classify(self._state, job.url, NO_HEADERS, job.body.encode())
        except NoHealthyReplica:
            return False  # its model's replicas are out of rotation: wait for them
        except GatewayError as exc:  # a model no replica serves: the answer a client gets
            self._refuse(job, exc)
            return True
        allowed = self._state.pool.available_for(sent.model)  # as a real-time request's
        again = self._previous(job, allowed)
        candidates = [again] if again is not None else [r for r in replicas if r in allowed]
        if not candidates:
            return False
        body, info = sent.body, sent.info
        lease = self._state.admission.take(candidates, info)
        lease.key = job.owner
        # A re-run goes back past the jobs threshold (see _previous); others take a job slot.
        limit = None if again is not None else slots(self._state, self._settings, lease.replica)
        task = asyncio.create_task(
            self._dispatch(job, lease, body, sent.path_qs, limit),
            name=f"job-{job.id}",
        )
        self._in_flight[job.id] = task
        # The lease is closed when the task ends, even one cancelled before its first step.
        task.add_done_callback(lambda t: self._done(job.id, t, lease))
        return True

    def _forget(self, job_id: str, task: asyncio.Task[None]) -> None:
        """The task ended; a newer attempt of the same job may be in flight under its id."""
        if self._in_flight.get(job_id) is task:
            del self._in_flight[job_id]

    def _previous(self, job: Job, allowed: Sequence[Replica]) -> Replica | None:
        """A job run again after its gateway died (or restarted) goes back to the replica that
        had it, when that one is in rotation and under its hard slot limit, even past the jobs
        threshold: it may have answered already, and then it answers again from its
        Idempotency-Key cache instead of running the model twice."""
        if job.replica is None or job.attempt < 2:
            return None
        replica = next((r for r in allowed if r.url == job.replica), None)
        return replica if replica is not None and self._state.admission.slot_free(replica) else None

    def _refuse(self, job: Job, error: GatewayError) -> None:
        def done(task: asyncio.Task[None]) -> None:
            self._forget(job.id, task)
            self._wake.set()

        task = asyncio.create_task(self._record(job, _refusal(error)), name=f"job-{job.id}")
        self._in_flight[job.id] = task
        task.add_done_callback(done)

    def _done(self, job_id: str, task: asyncio.Task[None], lease: Lease | None = None) -> None:
        """A job's task ended, however it did: the lease it was started with (if it was not
        taken inside the task) closes, and the scheduler looks again."""
        if lease is not None:
            lease.close()
        self._forget(job_id, task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s: dispatch failed", job_id, exc_info=task.exception())

    async def _dispatch(
        self, job: Job, lease: Lease, body: bytes, path: str, limit: int | None
    ) -> None:
        try:
            # Where it goes is recorded first, so a re-run after a crash can go back there;
            # the store counts every gateway's jobs there, so together they do not overfill.
            sending = await self._store.sent(job, lease.replica.url, limit)
            if sending == "full":  # other gateways' jobs, not yet in its load report
                self._full[lease.replica.url] = time.monotonic() + FULL_S
                await self._store.unclaim(job)
            if sending != "sent":
                return  # or cancelled or taken over meanwhile: not ours to run
            timeouts = self._state.runtime.config.timeouts
            reply = await self._send(job, lease.replica, body, path, timeouts)
        except StoreUnavailable as exc:  # not sent; its lease runs out and it runs again
            log.warning("job %s: attempt %d not sent: %s", job.id, job.attempt, exc)
            return
        except Exception as exc:  # never leave a job running until restart
            log.exception("job %s: dispatch failed", job.id)
            reply = Reply(None, f"gateway failed dispatching it: {type(exc).__name__}")
        lease.code = reply.code
        lease.close()
        outcome = outcome_of(reply, job, self._settings.max_attempts)
        metrics = self._metrics
        self._recording.add(job.id)
        try:
            if outcome is None:
                log.info("job %s: %s; queued again", job.id, reply.text[:200])
                if await self._store.requeue(job):
                    metrics.job_retries.inc()
            elif await self._store.finish(job, outcome):
                metrics.jobs_finished.labels(outcome.status).inc()
        except StoreUnavailable as exc:  # its lease runs out and a gateway runs it again
            log.warning("job %s: attempt %d not recorded: %s", job.id, job.attempt, exc)
        finally:
            self._recording.discard(job.id)

    async def _send(
        self, job: Job, replica: Replica, body: bytes, path: str, timeouts: Timeouts
    ) -> Reply:
        url = upstream_url(replica.url, path)
        # The job id as the key of every attempt: a replica that already answered one answers
        # a re-run from its cache (replica/idempotency.py).
        headers = {"Content-Type": "application/json", "X-Request-Id": job.id,
                   "Idempotency-Key": job.id}  # fmt: skip
        try:
            async with self._session().request(
                job.method,
                url,
                data=body,
                headers=headers,
                timeout=client_timeout(timeouts),
            ) as response:
                body = await read_capped(response, MAX_REPLY_BYTES)
        except TimeoutError:
            return Reply(None, f"replica {replica.url} did not answer in time")
        except BodyOverLimit as exc:
            text = f"replica {replica.url} replied with {exc}: too large to store"
            return Reply(None, text, final=True)
        except (aiohttp.ClientError, ValueError) as exc:
            return Reply(None, f"replica {replica.url} failed: {type(exc).__name__}")
        if response.status not in FINAL_STATUSES:  # aiohttp's client takes any three digits
            return Reply(
                None, f"replica {replica.url} answered an invalid status {response.status:03d}"
            )
        return Reply(response.status, body.decode("utf-8", "replace"))
