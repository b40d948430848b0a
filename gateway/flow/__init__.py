"""Flow control and tenancy: who sends a request (its tenant and class), the per-key limits
reserved at admission and settled from usage, and the order in which the gateway queue hands
out replica slots (strict classes, fairness between tenants, FIFO within a tenant). Pure rules
and the state they keep; the admission queue (gateway/pool/admission.py) applies them."""
