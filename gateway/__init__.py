"""infergate gateway: routes each client request to one model replica by a configured policy.

Data path, one module per stage: config -> pool (replica state) -> policies -> proxy -> server.
This package never imports torch.
"""
