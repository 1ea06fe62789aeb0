"""Router: worker registry, request placement and the per-request state machine."""
