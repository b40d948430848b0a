"""Benchmarks, fault drills and fuzzing for the gateway and the replica.

Every top-level module is a command (`python -m loadtests.NAME`, its usage in its docstring) that
produces a result: a table, a verdict, README's result blocks. They are built from four
subpackages, each importing only those before it (analysis.stats, pure arithmetic, from any):

- `load/`: what is sent: the seeded workload, the scenarios, the load generators (Locust users,
  the open-loop driver), the raw-sample CSV they write and the stream-completeness check;
- `sim/`: the discrete-event model: simulated replicas behind the gateway's own routing code;
- `harness/`: what runs: a bench's plan, gateway/replica/HAProxy processes, fleets for drills,
  a throwaway PostgreSQL, the relay benchmark's upstream and clients;
- `analysis/`: what is reported: statistics on raw samples, tables and charts, the model's bound.
"""
