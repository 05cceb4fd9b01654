"""Placement policies: pure functions of a request and a snapshot of the workers."""
