"""Deferred inference: durable jobs and batch files that run in the replicas' idle capacity.

requests (what a job asks for) -> model (a job, a batch, an outcome) -> store (the async Store
contract; SqliteStore over sqlite's JobStore, or postgres's PostgresStore: the one owner of job
state) -> scheduler (dispatch into spare capacity, classified as a real-time request) -> routes
(/v1/jobs, /v1/batches), service (their lifetime), forward (workers past the first), quota,
and client (the CLI).
"""
