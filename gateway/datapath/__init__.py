"""The data path: one client request from arrival to release, one module per stage, in order.

auth (the API key) · body (read whole, bounded) · classify (one parse: the model, what the
policy needs; models resolves aliases and who serves what) · tenancy (its tenant, class and
key limits: reserved before, settled after) · proxy (the attempts: a lease each, retries) ·
relay (one exchange streamed back: headers, sse, usage, frame_chunk, the cut) · transport
(the upstream contract: Upstream.send) · h1client (the HTTP/1.1 client behind it) · mock (its
double, for tests) · upstream (URL and timeout helpers for the aiohttp clients of jobs).
"""
