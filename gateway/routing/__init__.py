"""Routing: which replica a request goes to. Synchronous, no I/O, no aiohttp.

replica (the record of one replica, written only by the pool) · request (what a policy may know
of a request, and the Decision a lease carries) · options (each policy option type, embedded by
the config) · base (Policy, its hooks, `least`) · policies (the simple ones and the registry
POLICIES) · prefix_aware (PrefixAware, PrecisePrefix) · prefix (prompt block hashes and the
prefix index) · tokens (a prompt's token ids as the engine computes them: our byte tokenizer, or
a Hugging Face tokenizer.json and chat template; no I/O past loading them).
"""
