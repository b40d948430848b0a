"""Routing: which replica a request goes to. Synchronous, no I/O, no aiohttp.

replica (the record of one replica, written only by the pool) · request (what a policy may know
of a request, and the Decision a lease carries) · options (each policy option type, embedded by
the config) · policies (Policy with its hooks, the registry POLICIES) · prefix (prompt block
hashes and the prefix index).
"""
