"""infergate replica: torch models behind batchers, speaking OpenAI, KServe v2 and SageMaker.

Data path, one module per stage: routes (HTTP) -> batching (queue, batcher) -> engines
(forward pass) -> models (torch). `server.create_app` wires them; `cli.main` runs it.
"""
