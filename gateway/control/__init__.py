"""Control: the loops that feed the pool what replicas say of themselves.

probe (one shape for every poll: a plan per round, a pure parser, one timeout and failure rule,
an injectable fetch) · health (active checks) · load (load feedback; engines reads vLLM, SGLang
and TGI metrics) · models (served models) · cache_blocks (what replicas cache, polled, for the
policies that need it) · kv_events (the same from the engines' KV cache events as they happen;
kv_wire: their wire format) · discovery (DNS: the replica list itself) · fetch (the session,
capped reads) · limits_store (keys' limits leased in slices from PostgreSQL when several
gateways share them).
"""
