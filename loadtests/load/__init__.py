"""What a benchmark sends: the seeded workload and scenario shapes, the load generators (Locust
users, the open-loop driver), the raw-sample CSV every generator writes, and when a streamed
completion counts as complete."""
