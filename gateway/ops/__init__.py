"""Ops: what watches the gateway. They subscribe to the pool's, admission's and the proxy's
signals and read the pool; nothing below calls them.

metrics (Prometheus, the METRICS app key) · recent (rates and latency over the last seconds) ·
status (the /ui page) · models (the gateway's own GET /v1/models) · openapi (its document).
"""
