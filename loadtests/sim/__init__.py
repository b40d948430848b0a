"""The discrete-event model of the routing benchmark: simulated replicas on a simulated clock,
routed by the gateway's own pool and policies (`gateway.py`), run by `model.py`."""
