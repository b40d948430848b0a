"""Deferred inference: durable jobs and batch files that run in the replicas' idle capacity.

requests (what a job asks for) -> store (SQLite, the one owner of job state) -> scheduler
(dispatch into spare capacity) -> routes (/v1/jobs, /v1/batches) and client (the CLI).
"""
