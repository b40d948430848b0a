"""The pool: the one owner of replica state, and the gate every dispatch passes.

replicas (ReplicaPool: counts, health, ejection, load reports, served models; its `changed`
signal) · shared (the counts every worker of `workers: N` sees) · outlier (the ejection rule) ·
slots (how many requests a replica takes at once) · rules (what admission reads of the config)
· admission (the gateway queue, in flow control's order; its `lease_closed` and `dequeued`
signals) · lease (one dispatch, and what its outcome says) · live (the gateway in force: the
Runtime a reload swaps, with the pool, admission and the keys' limiter; the LIVE app key).
"""
