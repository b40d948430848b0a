"""The pool: the one owner of replica state, and the gate every dispatch passes.

replicas (ReplicaPool: counts, health, ejection, load reports, served models; its `changed`
signal) · shared (the counts every worker of `workers: N` sees) · outlier (the ejection rule) ·
admission (limits, the central queue, the Lease, its `lease_closed` signal) · live (the gateway
in force: the Runtime a reload swaps, with the pool and admission; the LIVE app key).
"""
