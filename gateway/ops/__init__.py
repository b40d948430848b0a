"""Ops: what watches the gateway. They subscribe to the pool's, admission's and the proxy's
signals and read the pool; nothing below calls them.

metrics (Prometheus, the METRICS app key; flow_metrics: queue, shedding, tenants, limits;
kv_metrics: the KV cache event feed) ·
recent (rates and latency over the last seconds) · status (the /ui page; tenants: its tenants
table) · models (the gateway's own GET /v1/models) · openapi (its document).
"""
