"""infergate gateway: routes each client request to one model replica by a configured policy.

The package is in wings, each importing only those below it (tests/unit/test_boundaries.py):

- `errors`, `config` (with `yamlfile`, `boundedjson`): error types, the config schema;
- `routing/`: the replica type, what a request asks, the policies and the prefix index (sync,
  no I/O);
- `flow/`: tenancy: who sends a request and its class, per-key limits (token buckets shared by
  the workers), the order of the fair queue (classes, tenants' service);
- `pool/`: the replicas' state, admission and the lease, outlier rules;
- `datapath/`: one request from arrival to release, in the order of its files: auth,
  classify, proxy, relay, and the HTTP/1.1 upstream client;
- `control/`: the loops that feed the pool (health, load, served models, cache blocks, DNS);
- `ops/`: metrics, status page, OpenAPI, the model list: they observe, nothing below calls them;
- `jobs/`: deferred jobs and batches;
- `app/`: the composition root (state, server, reload, cli, workers); nothing imports it;
- `cluster`: the `infergate up` launcher (replica processes and the gateway), apart from all.

This package never imports torch.
"""
