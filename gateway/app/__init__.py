"""The composition root: it makes the wings' objects, wires their signals, opens and closes
what lives with the process, and serves. Nothing imports it.

server (create_app: the app keys, the loops, the routes composed in one place) · checks (what a
request meets before its handler, the error middleware) · handlers (the gateway's own
endpoints) · state (what only the app reads: config path, admin token) · reload (hot reload) ·
cli (the `infergate` command) · workers and listener (`workers: N` processes sharing one port).
"""
