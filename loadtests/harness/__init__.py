"""What runs a benchmark: the routing bench's plan, gateway, HAProxy and load-generator
processes (one run), replica fleets for fault drills, a throwaway PostgreSQL server, and the two
ends of the streaming relay rig."""
